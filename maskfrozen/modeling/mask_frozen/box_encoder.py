"""Box feature encoder F_b of Mask Frozen-DETR (Sec. 4.3): ``R_i = F_b(R_i)``.

``transformer``: a linear channel mapper reduces the channels of the mask features F
(d -> d_b, per pixel, before RoIAlign: RoIAlign is linear, so this equals mapping each
R_i and pools fewer channels), then ``depth`` post-norm transformer layers run over the
``S x S`` tokens of each RoI, with a fixed sine embedding of the RoI grid as position.
``none`` keeps F and R_i.
"""
import torch
from torch import nn

from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.layers.transformer_blocks import FFN

__all__ = ["BOX_ENCODERS", "roi_position_embedding", "RoITransformerLayer", "BoxFeatureEncoder", "build_box_encoder"]

BOX_ENCODERS = ("none", "transformer")


def roi_position_embedding(size: int, dim: int, device=None) -> torch.Tensor:
    """``[1, S*S, dim]`` sine embedding of the cells of an ``S x S`` RoI grid (row-major)."""
    if dim % 2:
        raise ValueError(f"roi_position_embedding: dim must be even, got {dim}")
    mask = torch.zeros(1, size, size, dtype=torch.bool, device=device)
    return PositionEmbeddingSine(dim // 2, normalize=True)(mask).flatten(2).transpose(1, 2)


class RoITransformerLayer(nn.Module):
    """x = LN(x + SelfAttn(x + pos, x + pos, x)); x = LN(FFN(x)) over RoI tokens."""

    def __init__(self, dim: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, dim_feedforward, 0.0, "relu")
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.self_attn(q, k, x, need_weights=False)[0])
        return self.norm2(self.ffn(x))


class BoxFeatureEncoder(nn.Module):
    """Channel mapper on F (``map_channels``: ``[B, d, H, W] -> [B, d_b, H, W]``) and
    ``depth`` :class:`RoITransformerLayer` on its RoIs (``forward``: ``[M, d_b, S, S]``)."""

    def __init__(self, in_dim: int, dim: int, depth: int, roi_size: int, nhead: int = 8, dim_feedforward: int = 1024):
        super().__init__()
        self.channel_mapper = nn.Conv2d(in_dim, dim, 1)
        self.layers = nn.ModuleList(RoITransformerLayer(dim, nhead, dim_feedforward) for _ in range(depth))
        self.register_buffer("pos", roi_position_embedding(roi_size, dim), persistent=False)
        self.out_channels = dim

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


class IdentityBoxEncoder(nn.Module):
    """F_b = identity."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_channels = in_dim

    def map_channels(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return rois


def build_box_encoder(name: str, in_dim: int, dim: int, depth: int, roi_size: int, nhead: int = 8,
                      dim_feedforward: int = 1024) -> nn.Module:
    """F_b by name (``MODEL.MASK_FROZEN.BOX_ENCODER.NAME``); has ``out_channels``."""
    if name not in BOX_ENCODERS:
        raise ValueError(f"MODEL.MASK_FROZEN.BOX_ENCODER.NAME={name!r}; expected one of {BOX_ENCODERS}")
    if name == "none":
        return IdentityBoxEncoder(in_dim)
    if depth < 0:
        raise ValueError(f"MODEL.MASK_FROZEN.BOX_ENCODER.DEPTH must be >= 0, got {depth}")
    return BoxFeatureEncoder(in_dim, dim, depth, roi_size, nhead, dim_feedforward)
