"""Mask2Former's ``MSDeformAttnPixelDecoder``: the shared deformable encoder (our op) over
res3-res5, then an FPN lateral to the 1/4 feature and the mask-feature projection.

Per level l (coarsest first): ``x_l = GN(Conv1x1(C_l))``; ``E = Enc(x + sine pos + e_l)``
(``TRANSFORMER_ENC_LAYERS`` layers of deformable self-attention + FFN); for each finer
level (res2): ``y = ReLU(GN(Conv3x3(GN(Conv1x1(C_2)) + up(prev))))``; mask features
``F = Conv1x1(y)`` (D = ``MASK_DIM``). As in the official code, every position is valid
(padding masks are all False): the padded pixels are part of the image. The encoder's dropout
is ``MODEL.MASK_FORMER.DROPOUT`` as in the official code. Keys of ours: the official code takes
the encoder's heads from ``MODEL.MASK_FORMER.NHEADS`` and ignores
``SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS`` and ``..._N_POINTS`` (4 fixed); we read
them (same defaults, 8 and 4), and the FFN width from ``..._DIM_FEEDFORWARD`` (official: 1024
fixed, our default).
"""
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from maskfrozen.layers import DeformableEncoder, PositionEmbeddingSine, flatten_levels
from maskfrozen.modeling.registries import PIXEL_DECODER_REGISTRY

from ..fpn import fpn_convs, top_down_merge
from ..interface import PixelDecoderOutput, PixelDecoderSpec

__all__ = ["MSDeformAttnPixelDecoder"]


def _input_proj(in_channels: int, conv_dim: int) -> nn.Sequential:
    """1x1 conv + GroupNorm(32) (keys ``0.*``, ``1.*`` as in the official checkpoint)."""
    proj = nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
    nn.init.xavier_uniform_(proj[0].weight, gain=1)
    nn.init.constant_(proj[0].bias, 0)
    return proj


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder (see module doc)."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_in_features: List[str], conv_dim: int,
                 mask_dim: int, norm: str, num_encoder_layers: int, nheads: int, n_points: int,
                 dim_feedforward: int = 1024, dropout: float = 0.0, common_stride: int = 4):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)  # finest first
        self.in_features = [k for k, _ in shapes]
        trans = sorted(((k, s) for k, s in shapes if k in transformer_in_features), key=lambda kv: -kv[1].stride)
        self.transformer_in_features = [k for k, _ in trans]  # coarsest first
        self.transformer_strides = [s.stride for _, s in trans]
        self.input_proj = nn.ModuleList(_input_proj(s.channels, conv_dim) for _, s in trans)
        self.level_embed = nn.Parameter(torch.empty(len(trans), conv_dim).normal_())
        self.position_embedding = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.encoder = DeformableEncoder(num_encoder_layers, d_model=conv_dim, nhead=nheads,
                                         dim_feedforward=dim_feedforward, dropout=dropout, activation="relu",
                                         num_levels=len(trans), num_points=n_points)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_features)
        min_stride = min(self.transformer_strides)
        # FPN levels finer than the encoder's, finest first (official adapter_1 / layer_1 = res2)
        fpn = [k for k, s in shapes if common_stride <= s.stride < min_stride]
        self.fpn_features = fpn
        convs = [fpn_convs(input_shape[k].channels, conv_dim, norm) for k in fpn]
        self.lateral_convs = nn.ModuleList(lateral for lateral, _ in convs)
        self.output_convs = nn.ModuleList(output for _, output in convs)
        self.conv_dim, self.mask_dim = conv_dim, mask_dim
        self.mask_stride = input_shape[fpn[0]].stride if fpn else min_stride

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        h = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in h.IN_FEATURES if f not in input_shape]
        if missing or not set(h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES) <= set(h.IN_FEATURES):
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(h.IN_FEATURES)} must be backbone outputs "
                             f"({sorted(input_shape)}) and contain DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES "
                             f"{list(h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)}")
        return {
            "input_shape": {k: input_shape[k] for k in h.IN_FEATURES},
            "transformer_in_features": h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "conv_dim": h.CONVS_DIM, "mask_dim": h.MASK_DIM, "norm": h.NORM,
            "num_encoder_layers": h.TRANSFORMER_ENC_LAYERS, "nheads": h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "n_points": h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "dim_feedforward": h.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD, "common_stride": h.COMMON_STRIDE,
            "dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
        }

    def output_spec(self) -> PixelDecoderSpec:
        return PixelDecoderSpec(self.conv_dim, self.mask_dim, tuple(self.transformer_strides), self.mask_stride)

    def encode(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The deformable encoder over the transformer levels -> per-level maps, coarsest first."""
        srcs = [proj(features[f]) for proj, f in zip(self.input_proj, self.transformer_in_features)]
        masks = [torch.zeros(s.shape[0], *s.shape[-2:], dtype=torch.bool, device=s.device) for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        tokens, pos, geometry = flatten_levels(srcs, masks, pos, self.level_embed)
        return self.encoder(tokens, pos, geometry).level_maps()

    def forward(self, features: Dict[str, torch.Tensor]) -> PixelDecoderOutput:
        levels = self.encode(features)
        out = levels[-1]
        for j in reversed(range(len(self.fpn_features))):  # top-down: coarsest FPN level first
            out = top_down_merge(out, features[self.fpn_features[j]], self.lateral_convs[j], self.output_convs[j])
        return PixelDecoderOutput(self.mask_features(out), levels)
