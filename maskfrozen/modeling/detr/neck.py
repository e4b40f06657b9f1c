"""Channel mapper: backbone levels -> d_model channels, plus extra coarser levels."""
from typing import List

import torch
from torch import nn

__all__ = ["ChannelMapper"]


class ConvGN(nn.Module):
    """Conv2d followed by GroupNorm (``conv`` / ``norm`` attributes as in detrex)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ChannelMapper(nn.Module):
    """1x1 conv + GN per input level, then ``num_extra_levels`` 3x3 stride-2 conv + GN
    levels; the first extra level reads the last *backbone* map (Deformable-DETR).

    Output strides: the input strides, then the last stride x2 per extra level.
    """

    def __init__(self, in_channels: List[int], out_channels: int = 256, num_extra_levels: int = 1, num_groups: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1, 1, num_groups) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_extra_levels - 1)
        self.extra_convs = nn.ModuleList(ConvGN(c, out_channels, 3, 2, num_groups) for c in extra_in)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.convs):
            raise ValueError(f"ChannelMapper: got {len(features)} levels, built for {len(self.convs)}")
        outs = [conv(x) for conv, x in zip(self.convs, features)]
        x = features[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs
