"""``MSDeformAttn``: the multi-scale deformable attention layer of Deformable-DETR.

Each query predicts, per head m, level l and point p, a sampling offset
``Delta p_mlqk`` and an attention weight ``A_mlqk`` (softmax over levels x points)
from its own embedding; the op samples the projected value maps there
(:func:`maskfrozen.ops.ms_deform_attn`). Parameter names match Deformable-DETR and
detrex (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``)
so public checkpoints load by name.
"""
import math
from typing import Optional

import torch
from torch import nn

from maskfrozen.ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with value/output projections.

    Args:
        embed_dim: channels C of queries, values and output.
        num_heads: M; ``embed_dim`` must be divisible by it.
        num_levels: L, feature levels sampled.
        num_points: P, sampling points per head and level.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of per-head directions
        (head m points at angle 2*pi*m/M, scaled to the unit square's border) whose
        radius grows with the point index (1, 2, ..., P pixels); attention is uniform
        (zero weights and bias); projections are Xavier-uniform with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        radius = torch.arange(1, self.num_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1) * radius
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten().to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from each query around its reference point on every level.

        Args:
            query: ``[N, Len_q, C]`` (position embedding already added).
            reference_points: ``[N, Len_q, L, 2]`` normalised (x, y), offsets are in
                pixels of each level; or ``[N, Len_q, L, 4]`` boxes (cx, cy, w, h),
                offsets are scaled by ``(w, h) * 0.5 / num_points``.
            value: ``[N, Len_in, C]`` flattened multi-level features.
            spatial_shapes: ``[L, 2]`` int64 (H, W) per level.
            level_start_index: ``[L]`` int64 start of each level in ``Len_in``.
            padding_mask: ``[N, Len_in]`` bool, True at padded positions (their values are
                zeroed), or None.

        Returns:
            ``[N, Len_q, C]``.
        """
        n, len_q, c = query.shape
        if c != self.embed_dim:
            raise ValueError(f"MSDeformAttn: query has {c} channels, expected embed_dim={self.embed_dim}")
        if value.dim() != 3 or value.shape[0] != n or value.shape[2] != self.embed_dim:
            raise ValueError(
                f"MSDeformAttn: value must be [N={n}, Len_in, C={self.embed_dim}], got {tuple(value.shape)}"
            )
        len_in = value.shape[1]
        m, num_levels, num_points = self.num_heads, self.num_levels, self.num_points
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (n, len_q, num_levels) or (
            reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"MSDeformAttn: reference_points must be [N={n}, Len_q={len_q}, L={num_levels}, 2 or 4], "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(value)
        if padding_mask is not None:
            if tuple(padding_mask.shape) != (n, len_in) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MSDeformAttn: padding_mask must be a bool [N={n}, Len_in={len_in}] tensor, "
                    f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
                )
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, len_in, m, self.embed_dim // m)

        offsets = self.sampling_offsets(query).view(n, len_q, m, num_levels, num_points, 2)
        weights = self.attention_weights(query).view(n, len_q, m, num_levels * num_points)
        weights = weights.softmax(-1).view(n, len_q, m, num_levels, num_points)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)

        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)

    def _sampling_locations(
        self, reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """``[N, Len_q, M, L, P, 2]`` normalised locations = reference + scaled offsets."""
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        centres = reference_points[:, :, None, :, None, :2]
        sizes = reference_points[:, :, None, :, None, 2:]
        return centres + offsets / self.num_points * sizes * 0.5
