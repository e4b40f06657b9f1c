"""Sine position encodings (DETR / Deformable-DETR / DINO conventions)."""
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_embedding"]


def _sin_cos_blocks(angles: torch.Tensor) -> torch.Tensor:
    """``[..., D, F / 2]`` angles -> ``[..., D * F]``: per coordinate ``d`` the block
    (sin(a_0), cos(a_0), sin(a_1), cos(a_1), ...), DETR's interleaved channels.

    DETR computes ``sin(c / dim_t[2i])`` and ``cos(c / dim_t[2i + 1])``; the frequencies come
    in equal pairs (``dim_t[2i] == dim_t[2i + 1]``, see :func:`_frequencies`), so each angle is
    computed once here, from ``dim_t[0::2]``: the same numbers in a third of the ops (which is
    what ``torch.export`` pays for, per op, with dynamic shapes)."""
    return torch.stack((angles.sin(), angles.cos()), -1).flatten(-3)


def _frequencies(num_feats: int, temperature: float, device, dtype) -> torch.Tensor:
    """DETR's dim_t: temperature ** (2 * (i // 2) / num_feats), i = 0..num_feats-1."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return (temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)).to(dtype)


class PositionEmbeddingSine(nn.Module):
    """2-D sine embedding of a padded feature map: ``mask [N, H, W]`` (True = padding)
    -> ``[N, 2 * num_pos_feats, H, W]``, channels (y, x).

    With ``normalize`` the cumulative coordinates are divided by the valid height/width
    of each image (``(c + offset) / (last + eps) * scale``), so the embedding of the
    valid region does not depend on how much padding follows it. DINO in detrex uses
    ``offset=-0.5``; Deformable-DETR uses 0.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
        offset: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"PositionEmbeddingSine: mask must be bool [N, H, W], got {mask.dtype} {tuple(mask.shape)}")
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device, torch.float32)[0::2]
        angles = torch.stack((y_embed, x_embed), -1)[..., None] / dim_t  # [N, H, W, 2 (y, x), F / 2]
        return _sin_cos_blocks(angles).permute(0, 3, 1, 2)


def sine_embedding(
    coords: torch.Tensor,
    num_feats: int = 128,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    exchange_xy: bool = True,
) -> torch.Tensor:
    """Sine embedding of normalised coordinates (points or boxes):
    ``[..., D]`` -> ``[..., D * num_feats]``, one ``num_feats`` block per coordinate.

    ``exchange_xy=True`` puts y before x: DINO's ``(y, x, w, h)`` order.
    Deformable-DETR's two-stage proposal embedding uses ``(x, y, w, h)`` (False).
    """
    if exchange_xy and coords.shape[-1] >= 2:
        coords = torch.cat([coords[..., 1:2], coords[..., :1], coords[..., 2:]], -1)
    dim_t = _frequencies(num_feats, temperature, coords.device, coords.dtype)[0::2]
    return _sin_cos_blocks((coords * scale)[..., None] / dim_t)
