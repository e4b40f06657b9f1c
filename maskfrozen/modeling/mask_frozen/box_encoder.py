"""Box feature encoder F_b of Mask Frozen-DETR (Sec. 4.3): ``R_i = F_b(R_i)``.

``transformer``: a linear channel mapper reduces the channels of the mask features F
(d -> d_b, per pixel, before RoIAlign: RoIAlign is linear, so this equals mapping each
R_i and pools fewer channels), then ``depth`` post-norm transformer layers (shared
self-attention + FFN sub-layers) run over the ``S x S`` tokens of each RoI, with a fixed
sine embedding of the RoI grid as position. ``none`` keeps F and R_i. Both are
registered in ``BOX_ENCODER_REGISTRY``.
"""
import torch
from detectron2.config import CfgNode, configurable
from torch import nn

from maskfrozen.layers.attention import FFNLayer, SelfAttentionLayer
from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.modeling.registries import BOX_ENCODER_REGISTRY, build_from_registry

__all__ = ["roi_position_embedding", "RoITransformerLayer", "BoxFeatureEncoder", "IdentityBoxEncoder",
           "build_box_encoder"]


def roi_position_embedding(size: int, dim: int, device=None) -> torch.Tensor:
    """``[1, S*S, dim]`` sine embedding of the cells of an ``S x S`` RoI grid (row-major)."""
    if dim % 2:
        raise ValueError(f"roi_position_embedding: dim must be even, got {dim}")
    mask = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    return PositionEmbeddingSine(dim // 2, normalize=True)(mask).flatten(2).transpose(1, 2)


class RoITransformerLayer(nn.Module):
    """Self-attention over the RoI tokens (position on queries and keys), then FFN."""

    def __init__(self, dim: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, nhead)
        self.ffn = FFNLayer(dim, dim_feedforward)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(x, pos))


@BOX_ENCODER_REGISTRY.register()
class BoxFeatureEncoder(nn.Module):
    """Channel mapper on F (``map_channels``: ``[B, d, H, W] -> [B, d_b, H, W]``) and
    ``depth`` :class:`RoITransformerLayer` on its RoIs (``forward``: ``[M, d_b, S, S]``)."""

    config_name = "transformer"

    @configurable
    def __init__(self, in_dim: int, dim: int, depth: int, roi_size: int, nhead: int = 8, dim_feedforward: int = 1024):
        super().__init__()
        if depth < 0:
            raise ValueError(f"MODEL.MASK_FROZEN.BOX_ENCODER.DEPTH must be >= 0, got {depth}")
        self.channel_mapper = nn.Conv2d(in_dim, dim, 1)
        self.layers = nn.ModuleList(RoITransformerLayer(dim, nhead, dim_feedforward) for _ in range(depth))
        self.register_buffer("pos", roi_position_embedding(roi_size, dim), persistent=False)
        self.out_channels = dim

    @classmethod
    def from_config(cls, cfg: CfgNode, in_dim: int):
        m = cfg.MODEL.MASK_FROZEN
        b = m.BOX_ENCODER
        return {"in_dim": in_dim, "dim": b.DIM, "depth": b.DEPTH, "roi_size": m.ROI_SIZE, "nhead": b.NHEADS,
                "dim_feedforward": b.DIM_FEEDFORWARD}

    def map_channels(self, features: torch.Tensor) -> torch.Tensor:
        return self.channel_mapper(features)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        m, _, h, w = rois.shape
        if h * w != self.pos.shape[1]:
            raise ValueError(f"BoxFeatureEncoder: RoIs are {h}x{w}, built for {self.pos.shape[1]} cells")
        x = rois.flatten(2).transpose(1, 2)
        pos = self.pos.to(x.dtype)
        for layer in self.layers:
            x = layer(x, pos)
        return x.transpose(1, 2).reshape(m, -1, h, w)


@BOX_ENCODER_REGISTRY.register()
class IdentityBoxEncoder(nn.Module):
    """F_b = identity."""

    config_name = "none"

    @configurable
    def __init__(self, in_dim: int):
        super().__init__()
        self.out_channels = in_dim

    @classmethod
    def from_config(cls, cfg: CfgNode, in_dim: int):
        return {"in_dim": in_dim}

    def map_channels(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return rois


def build_box_encoder(cfg: CfgNode, in_dim: int) -> nn.Module:
    """F_b named by ``MODEL.MASK_FROZEN.BOX_ENCODER.NAME`` on features of ``in_dim``
    channels; the result has ``out_channels``."""
    name = cfg.MODEL.MASK_FROZEN.BOX_ENCODER.NAME
    return build_from_registry(BOX_ENCODER_REGISTRY, name, "MODEL.MASK_FROZEN.BOX_ENCODER.NAME", cfg, in_dim)
