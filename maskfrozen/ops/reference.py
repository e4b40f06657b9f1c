"""Pure-PyTorch multi-scale deformable attention: the ground truth, not the fast path.

Deformable-DETR (Zhu et al., 2021), eq. 3: for query q, head m,
``out[q, m] = sum_l sum_p A[q, m, l, p] * V_l^m(phi_l(loc[q, m, l, p]))`` where ``V_l^m``
is bilinearly sampled at ``loc * (W_l, H_l) - 0.5`` (pixel centres at half-integers,
i.e. ``grid_sample(..., align_corners=False)``) with zeros outside the map. A NaN or
infinite location reads NaN, and a NaN weight makes the output of its (query, head) NaN;
the compiled kernels do the same.
"""
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: Union[torch.Tensor, Sequence[Sequence[int]]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """One ``grid_sample`` per level, then the attention-weighted sum.

    Args:
        value: ``[N, Len_in, M, D]``, levels flattened row-major and concatenated.
        spatial_shapes: ``[L, 2]`` (H, W) per level: a tensor, or its values as a host-side
            sequence of (H, W) pairs (no device-to-host copy then).
        sampling_locations: ``[N, Len_q, M, L, P, 2]`` normalised (x, y).
        attention_weights: ``[N, Len_q, M, L, P]``.

    Returns:
        ``[N, Len_q, M * D]``.
    """
    n, _, m, d = value.shape
    _, len_q, _, num_levels, num_points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes: List[List[int]] = [list(hw) for hw in spatial_shapes]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants grids in [-1, 1]; heads fold into the batch.
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # [N*M, Lq, L, P, 2]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        sampled.append(
            F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, len_q, num_levels * num_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, len_q).transpose(1, 2).contiguous()
