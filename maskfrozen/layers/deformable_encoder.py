"""The multi-scale deformable encoder (Deformable-DETR), shared by the DETR transformer,
Mask Frozen-DETR's image encoder and Mask2Former's pixel decoder.

:func:`flatten_levels` turns per-level maps ``[N, C, H_l, W_l]`` (with their padding
masks and position embeddings) into one token sequence plus its geometry
(:class:`LevelGeometry`); :class:`DeformableEncoder` runs L layers of deformable
self-attention + FFN over it; :class:`EncoderOutput` is its structured result, which
every consumer reads (per-level maps, padding masks, geometry).
"""
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import DeformableAttentionLayer, FFNLayer

__all__ = [
    "LevelGeometry",
    "EncoderOutput",
    "flatten_levels",
    "level_index_tensors",
    "valid_ratios_of",
    "encoder_reference_points",
    "pixel_centres",
    "valid_sizes",
    "DeformableEncoderLayer",
    "DeformableEncoder",
]


@dataclass
class LevelGeometry:
    """Where each level lies in a flattened multi-level sequence (S = sum_l H_l W_l).

    The level sizes are kept on the host too (``sizes``), so nothing here reads a device
    tensor back; ``spatial_shapes`` / ``level_start_index`` are the same tensor objects for
    every batch of the same level sizes on a device, so the op's once-per-tensor checks
    run once, not once per forward."""

    spatial_shapes: torch.Tensor  # [L, 2] int64 (H, W)
    level_start_index: torch.Tensor  # [L] int64
    valid_ratios: torch.Tensor  # [N, L, 2] valid (w, h) fraction of each level
    padding_mask: torch.Tensor  # [N, S] bool, True = padding
    sizes: Tuple[Tuple[int, int], ...]  # ((H_l, W_l), ...) as Python ints

    def level_sizes(self) -> List[Tuple[int, int]]:
        """``[(H_l, W_l)]`` as Python ints (no device read)."""
        return list(self.sizes)

    def split_levels(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """``[N, S, C]`` tokens -> per-level maps ``[N, C, H_l, W_l]``."""
        sizes = self.level_sizes()
        chunks = tokens.split([h * w for h, w in sizes], dim=1)
        return [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w) for x, (h, w) in zip(chunks, sizes)]

    def level_padding_masks(self) -> List[torch.Tensor]:
        """Per-level ``[N, H_l, W_l]`` padding masks."""
        sizes = self.level_sizes()
        n = self.padding_mask.shape[0]
        chunks = self.padding_mask.split([h * w for h, w in sizes], 1)
        return [m.view(n, h, w) for m, (h, w) in zip(chunks, sizes)]

    def geometry(self) -> "LevelGeometry":
        """The geometry alone (also of a subclass instance such as :class:`EncoderOutput`)."""
        return LevelGeometry(**{f.name: getattr(self, f.name) for f in fields(LevelGeometry)})


@dataclass
class EncoderOutput(LevelGeometry):
    """The encoder memory with its geometry."""

    memory: torch.Tensor  # [N, S, C]

    def level_maps(self) -> List[torch.Tensor]:
        """The memory as per-level maps ``[N, C, H_l, W_l]``."""
        return self.split_levels(self.memory)


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` padding mask -> ``[N, 2]`` valid (w, h) fractions."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def _level_index_tensors(sizes, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`level_index_tensors` uncached: also for symbolic sizes while ``torch.export``
    traces (``torch.tensor`` keeps them symbolic where ``torch.as_tensor`` would fix them)."""
    shapes = torch.tensor(sizes, dtype=torch.int64, device=device)
    starts, total = [], 0
    for h, w in sizes:
        starts.append(total)
        total = total + h * w
    return shapes, torch.tensor(starts, dtype=torch.int64, device=device)


@lru_cache(maxsize=64)
def level_index_tensors(sizes: Tuple[Tuple[int, int], ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``spatial_shapes [L, 2]``, ``level_start_index [L]``) int64 on ``device``, one pair
    of tensors per distinct level sizes (never modified in place)."""
    return _level_index_tensors(sizes, device)


def flatten_levels(srcs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor],
                   level_embeds: Optional[torch.Tensor] = None):
    """Concatenate the levels into sequences.

    Args:
        srcs / pos_embeds: per level ``[N, C, H_l, W_l]``; masks: ``[N, H_l, W_l]`` bool.
        level_embeds: ``[L, C]`` added to each level's position embedding, or None.
    Returns:
        (tokens ``[N, S, C]``, positions ``[N, S, C]``, :class:`LevelGeometry`).
    """
    if not (len(srcs) == len(masks) == len(pos_embeds)):
        raise ValueError(f"flatten_levels: got {len(srcs)} maps, {len(masks)} masks, {len(pos_embeds)} position maps")
    if level_embeds is not None and len(level_embeds) != len(srcs):
        raise ValueError(f"flatten_levels: got {len(srcs)} feature levels, built for {len(level_embeds)}")
    sizes = tuple((s.shape[-2], s.shape[-1]) for s in srcs)  # ints (symbolic while exporting: dynamic H, W)
    index_tensors = _level_index_tensors if torch.compiler.is_exporting() else level_index_tensors
    shapes, start = index_tensors(sizes, srcs[0].device)
    tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    pos = [p.flatten(2).transpose(1, 2) for p in pos_embeds]
    if level_embeds is not None:
        pos = [p + level_embeds[lvl] for lvl, p in enumerate(pos)]
    geometry = LevelGeometry(
        spatial_shapes=shapes, level_start_index=start,
        valid_ratios=torch.stack([valid_ratios_of(m) for m in masks], 1),
        padding_mask=torch.cat([m.flatten(1) for m in masks], 1), sizes=sizes)
    return tokens, torch.cat(pos, 1), geometry


def pixel_centres(h: int, w: int, device) -> torch.Tensor:
    """``[h * w, 2]`` (x, y) pixel centres in pixels, row-major."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device) + 0.5,
        torch.arange(w, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def valid_sizes(geometry: LevelGeometry, lvl: int, size) -> torch.Tensor:
    """``[N, 2]`` valid (w, h) in pixels of level ``lvl`` (of ``size`` (H, W))."""
    h, w = size
    start = sum(a * b for a, b in geometry.sizes[:lvl])
    m = geometry.padding_mask[:, start: start + h * w].view(-1, h, w)
    return torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).float()


def encoder_reference_points(geometry: LevelGeometry) -> torch.Tensor:
    """``[N, S, L, 2]`` the pixel centre of every token, normalised by the valid size of
    its level and expressed in every level's padded coordinates (Deformable-DETR)."""
    refs = []
    for lvl, size in enumerate(geometry.level_sizes()):
        valid = valid_sizes(geometry, lvl, size)
        refs.append(pixel_centres(*size, geometry.padding_mask.device)[None] / valid[:, None, :])
    return torch.cat(refs, 1)[:, :, None] * geometry.valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN (post-norm by default)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 num_levels: int, num_points: int, normalize_before: bool = False):
        super().__init__()
        self.self_attn = DeformableAttentionLayer(d_model, nhead, num_levels, num_points, dropout, normalize_before)
        self.ffn = FFNLayer(d_model, dim_feedforward, dropout, activation, normalize_before)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                geometry: LevelGeometry) -> torch.Tensor:
        src = self.self_attn(src, pos, reference_points, None, geometry.spatial_shapes, geometry.level_start_index,
                             geometry.padding_mask)
        return self.ffn(src)


class DeformableEncoder(nn.Module):
    """``num_layers`` :class:`DeformableEncoderLayer` over a flattened multi-level sequence."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, geometry: LevelGeometry) -> EncoderOutput:
        """``src``/``pos`` ``[N, S, C]`` (level embeddings already in ``pos``)."""
        reference_points = encoder_reference_points(geometry)
        for layer in self.layers:
            src = layer(src, pos, reference_points, geometry)
        return EncoderOutput(**vars(geometry.geometry()), memory=src)
