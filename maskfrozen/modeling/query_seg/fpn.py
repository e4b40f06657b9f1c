"""The FPN step shared by the pixel decoders (Mask2Former's res2 branch, FastInst's PPM-FPN):
``y = ReLU(Norm(Conv3x3(Norm(Conv1x1(C)) + up(coarser))))``."""
from typing import Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm

__all__ = ["fpn_convs", "top_down_merge"]


def fpn_convs(in_channels: int, conv_dim: int, norm: str) -> Tuple[Conv2d, Conv2d]:
    """The lateral 1x1 conv and the output 3x3 conv (+ ReLU) of one FPN level (detectron2
    ``Conv2d`` with ``norm``, bias only without one; Caffe2 Xavier init)."""
    use_bias = norm == ""
    lateral = Conv2d(in_channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
    output = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=use_bias, norm=get_norm(norm, conv_dim), activation=F.relu)
    weight_init.c2_xavier_fill(lateral)
    weight_init.c2_xavier_fill(output)
    return lateral, output


def top_down_merge(coarser: torch.Tensor, feature: torch.Tensor, lateral: Conv2d, output: Conv2d) -> torch.Tensor:
    """``output(lateral(feature) + bilinear upsampling of coarser to its size)``."""
    x = lateral(feature)
    return output(x + F.interpolate(coarser, size=x.shape[-2:], mode="bilinear", align_corners=False))
