"""FastInst's light pixel decoder ``PyramidPoolingModuleFPN``: an FPN over res3-res5 whose
coarsest lateral goes through a pyramid pooling module (PSPNet's PPM).

Per level, coarsest first: ``y_5 = Out_5(PPM(Lat_5(C_5)))``, ``y_l = Out_l(Lat_l(C_l) +
up(y_{l+1}))`` (the shared FPN step). Output: the three maps ``[y_5, y_4, y_3]`` at 1/32,
1/16, 1/8 and no mask features (FastInst's decoder projects its own per layer from the 1/8
pixels). PPM(x) = ReLU(Conv1x1([x, up(ReLU(Conv1x1(AvgPool_s(x)))) for s in 1, 2, 3, 6])),
each branch with C/4 channels.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import nn

from maskfrozen.modeling.registries import PIXEL_DECODER_REGISTRY

from ..fpn import fpn_convs, top_down_merge
from ..interface import PixelDecoderOutput, PixelDecoderSpec

__all__ = ["PyramidPoolingModule", "PyramidPoolingModuleFPN"]


class PyramidPoolingModule(nn.Module):
    """Context at several pooled sizes, concatenated with the input and fused by a 1x1 conv."""

    def __init__(self, channels: int, branch_channels: int, sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), Conv2d(channels, branch_channels, 1)) for size in sizes)
        self.bottleneck = Conv2d(channels + len(sizes) * branch_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(F.relu(stage(x)), size=size, mode="bilinear", align_corners=False)
                  for stage in self.stages]
        return F.relu(self.bottleneck(torch.cat([*pooled, x], dim=1)))


@PIXEL_DECODER_REGISTRY.register()
class PyramidPoolingModuleFPN(nn.Module):
    """PPM-FPN pixel decoder (see module doc): ``forward(features) -> PixelDecoderOutput``
    with 3 levels, coarsest first, and ``mask_features`` None."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int, norm: str):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: -kv[1].stride)  # coarsest first
        if len(shapes) != 3:
            raise ValueError(f"PyramidPoolingModuleFPN needs 3 input features (res3-res5), got {[k for k, _ in shapes]}")
        self.in_features: List[str] = [k for k, _ in shapes]
        self.strides = [s.stride for _, s in shapes]
        convs = [fpn_convs(s.channels, conv_dim, norm) for _, s in shapes]
        self.lateral_convs = nn.ModuleList(lateral for lateral, _ in convs)
        self.output_convs = nn.ModuleList(output for _, output in convs)
        self.ppm = PyramidPoolingModule(conv_dim, conv_dim // 4)
        self.conv_dim, self.mask_dim = conv_dim, mask_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        h = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in h.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(h.IN_FEATURES)}: {missing} are not backbone "
                             f"outputs ({sorted(input_shape)}; set MODEL.RESNETS.OUT_FEATURES)")
        return {"input_shape": {k: input_shape[k] for k in h.IN_FEATURES}, "conv_dim": h.CONVS_DIM,
                "mask_dim": h.MASK_DIM, "norm": h.NORM}

    def output_spec(self) -> PixelDecoderSpec:
        return PixelDecoderSpec(self.conv_dim, self.mask_dim, tuple(self.strides), mask_stride=None)

    def forward(self, features: Dict[str, torch.Tensor]) -> PixelDecoderOutput:
        coarsest = self.in_features[0]
        y = self.output_convs[0](self.ppm(self.lateral_convs[0](features[coarsest])))
        levels = [y]
        for name, lateral, output in zip(self.in_features[1:], self.lateral_convs[1:], self.output_convs[1:]):
            y = top_down_merge(y, features[name], lateral, output)
            levels.append(y)
        return PixelDecoderOutput(None, levels)
