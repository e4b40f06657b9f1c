"""SOTR heads (Sec. 3.2-3.3): the functional heads on the twin transformer (class and
kernel per grid cell), the multi-level upsampling mask branch, and the dynamic convolution.

Shapes: ``B`` images, ``S_l = N_l x N_l`` cells at level ``l``, ``K`` classes, ``D`` kernel
parameters (the mask feature ``F`` has ``D`` channels: the kernels are 1x1, ``D = lambda^2 C``
with ``lambda = 1`` as in the public code).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .twin_attention import TwinTransformer

__all__ = ["SOTRHead", "MaskBranch", "dynamic_conv", "resample_to_stride", "level_features"]


def resample_to_stride(feature: torch.Tensor, stride: int, feature_stride: int, base_size: Tuple[int, int],
                       base_stride: int) -> torch.Tensor:
    """Bilinearly resize a ``stride``-level feature to the ``stride`` grid of the padded
    image (``base_size`` at ``base_stride``): SOTR's ``split_feats`` (P2 halved, P6 to P5's size)."""
    if stride == feature_stride:
        return feature
    size = (base_size[0] * base_stride // stride, base_size[1] * base_stride // stride)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def dynamic_conv(mask_feature: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``Z = F * K``: each of the ``n`` kernels ``[n, D]`` as a 1x1 conv over one image's mask
    feature ``F [D, H, W]`` -> mask logits ``[n, H, W]``."""
    return torch.einsum("nd,dhw->nhw", kernels, mask_feature)


class SOTRHead(nn.Module):
    """One twin transformer shared by all levels; per level the feature is resized to its
    ``N x N`` grid, encoded, and read by the class head (``N x N x K``) and kernel head
    (``N x N x D``), both single linear layers."""

    def __init__(self, transformer: TwinTransformer, dim: int, num_classes: int, num_kernels: int,
                 num_grids: Sequence[int], prior_prob: float = 0.01):
        super().__init__()
        self.transformer = transformer
        self.num_grids = list(num_grids)
        self.cate = nn.Linear(dim, num_classes)
        self.kernel = nn.Linear(dim, num_kernels)
        nn.init.constant_(self.cate.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, level_features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """``level_features[l] [B, C, h_l, w_l]`` (already at the instance strides) ->
        (class logits ``[B, N_l, N_l, K]``, kernels ``[B, N_l, N_l, D]``) per level."""
        logits, kernels = [], []
        for feature, n in zip(level_features, self.num_grids):
            grid = F.interpolate(feature, size=(n, n), mode="bilinear", align_corners=False)
            encoded = self.transformer(grid).permute(0, 2, 3, 1)
            logits.append(self.cate(encoded))
            kernels.append(self.kernel(encoded))
        return logits, kernels


def _conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, gn_groups: int) -> List[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(gn_groups, out_channels), nn.ReLU(inplace=True)]


class MaskBranch(nn.Module):
    """Multi-level upsampling (Sec. 3.3): level ``i`` (P2, P3, P4, transformer-refined P5)
    goes through ``max(i, 1)`` blocks of conv3x3+GN+ReLU, each followed by a 2x bilinear
    upsample after the first level, to 1/4 scale; the maps are summed and a 1x1 conv+GN+ReLU
    gives the ``D``-channel mask feature ``F``. Convolutions initialised N(0, 0.01) (official)."""

    def __init__(self, num_levels: int, in_channels: int, mask_channels: int, out_channels: int,
                 gn_groups: int = 32):
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            blocks: List[nn.Module] = []
            for j in range(max(i, 1)):
                block = _conv_gn_relu(in_channels if j == 0 else mask_channels, mask_channels, 3, gn_groups)
                if i > 0:
                    block.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                blocks.append(nn.Sequential(*block))
            self.levels.append(nn.Sequential(*blocks))
        self.out = nn.Sequential(*_conv_gn_relu(mask_channels, out_channels, 1, gn_groups))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """``features`` from fine (1/4) to coarse -> ``F [B, D, H/4, W/4]``."""
        total = self.levels[0](features[0])
        for level, feature in zip(self.levels[1:], features[1:]):
            up = level(feature)
            if up.shape[-2:] != total.shape[-2:]:
                up = F.interpolate(up, size=total.shape[-2:], mode="bilinear", align_corners=False)
            total = total + up
        return self.out(total)


def level_features(features: Dict[str, torch.Tensor], names: Sequence[str], strides: Sequence[int],
                   feature_strides: Dict[str, int]) -> List[torch.Tensor]:
    """The instance-branch inputs: ``features[name]`` resampled to each level's stride."""
    base = features[names[0]]
    base_stride = feature_strides[names[0]]
    return [resample_to_stride(features[n], s, feature_strides[n], base.shape[-2:], base_stride)
            for n, s in zip(names, strides)]
