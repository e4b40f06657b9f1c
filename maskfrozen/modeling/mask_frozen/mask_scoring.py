"""Mask scoring head of Mask Frozen-DETR (Sec. 4.5): the frozen detector's class score
says nothing about mask quality, so a small head predicts the IoU of each mask with its
ground truth, ``iou_i = MLP(Flatten(Conv(Cat(M_i, R_i))))``, and the final score is
``s_i = c_i * iou_i`` (as in Mask Scoring R-CNN)."""
import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers.transformer_blocks import MLP

__all__ = ["MaskIoUHead"]


class MaskIoUHead(nn.Module):
    """``num_convs`` 3x3 conv + ReLU (the last one stride 2) on ``Cat(M_i, R_i)``, average
    pooling to ``pool_size x pool_size`` (keeps the MLP small whatever the RoI size), then
    an MLP of ``num_fc`` hidden layers to one sigmoid output, the predicted mask IoU.

    Args:
        in_channels: channels of the RoI features R_i (the mask adds one).
    """

    def __init__(self, in_channels: int, conv_dim: int = 256, num_convs: int = 2, fc_dim: int = 256,
                 num_fc: int = 2, pool_size: int = 4):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"MaskIoUHead: num_convs must be >= 1, got {num_convs}")
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + 1 if i == 0 else conv_dim, conv_dim, 3, stride=2 if i == num_convs - 1 else 1,
                      padding=1) for i in range(num_convs))
        self.pool_size = pool_size
        self.mlp = MLP(conv_dim * pool_size * pool_size, fc_dim, 1, num_fc + 1)
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, mask_probs: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``mask_probs [M, 1, S, S]``, ``rois [M, C, S, S]`` -> ``[M]`` IoU in (0, 1)."""
        x = torch.cat([mask_probs.to(rois.dtype), rois], 1)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = F.adaptive_avg_pool2d(x, self.pool_size)
        return self.mlp(x.flatten(1)).squeeze(1).sigmoid()
