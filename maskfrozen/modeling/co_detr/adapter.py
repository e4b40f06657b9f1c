"""Co-DETR's multi-scale adapter: the encoder memory back into per-level maps, plus one
extra coarser level (3x3 stride-2 conv + GroupNorm on the coarsest map), the pyramid the
auxiliary heads read (public Co-DETR: ``query_head.downsample``)."""
from typing import List

import torch
from torch import nn

from maskfrozen.layers.deformable_encoder import EncoderOutput

__all__ = ["MultiScaleAdapter"]


class MultiScaleAdapter(nn.Module):
    """``EncoderOutput`` -> ``L + 1`` maps ``[N, C, H_l, W_l]`` with strides
    ``level_strides + [2 * level_strides[-1]]``.

    Padded cells are left as the encoder computed them (the public code does the same);
    the heads treat every location alike, as mmdet's ATSS/RPN do with ``allowed_border=-1``.
    """

    def __init__(self, channels: int, level_strides: List[int], num_groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.strides = list(level_strides) + [2 * level_strides[-1]]
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, encoded: EncoderOutput) -> List[torch.Tensor]:
        maps = encoded.level_maps()
        return maps + [self.norm(self.conv(maps[-1]))]
