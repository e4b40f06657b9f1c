"""Point sampling for mask losses (PointRend / Mask2Former style).

Mask losses are computed on N points per mask instead of every pixel. The points are
chosen by *importance sampling*: ``k * N`` uniformly random candidates are drawn
(oversample ratio ``k > 1``), the ``beta * N`` most uncertain of them (prediction
closest to the decision boundary, i.e. logit closest to 0) are kept, and
``(1 - beta) * N`` fresh uniform points are added for coverage. Mask Frozen-DETR
(Sec. 4.5, "mask loss on sampled points") and Mask2Former use exactly this scheme.

Coordinates are normalised ``(x, y)`` in ``[0, 1]`` over the sampled map, where
``(0, 0)`` is the top-left corner of the top-left pixel (``grid_sample`` with
``align_corners=False``): the same convention as detectron2's mask pasting.

Every uniform draw (importance-sampling candidates and fresh points here, the Hungarian
matcher's shared points) goes through :func:`uniform_points`; inside :func:`replay_points` the
draws are taken from a given sequence instead, e.g. the draws an official implementation made
in the same run (the golden tests compare losses with the random parts fixed this way).
"""
import contextlib
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "logit_uncertainty", "uniform_points", "replay_points", "importance_sample_points",
           "box_points_to_image"]

_replayed: List[Iterator[torch.Tensor]] = []  # the active replay_points sequences, innermost last


def uniform_points(num_masks: int, num_points: int, device: torch.device, dtype: torch.dtype = torch.float32,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[M, P, 2]`` uniform random (x, y) in [0, 1): ``torch.rand``, or inside
    :func:`replay_points` the sequence's next tensor (it must hold ``M * P * 2`` values)."""
    if not _replayed:
        return torch.rand(num_masks, num_points, 2, device=device, dtype=dtype, generator=generator)
    value = next(_replayed[-1], None)
    if value is None:
        raise RuntimeError(f"replay_points: the sequence ran out (a draw of {num_masks} x {num_points} points asked)")
    if value.numel() != num_masks * num_points * 2:
        raise ValueError(f"replay_points: the next draw has shape {tuple(value.shape)}, but {num_masks} x "
                         f"{num_points} points (x, y) are asked: the sequences are out of step")
    return value.reshape(num_masks, num_points, 2).to(device=device, dtype=dtype)


@contextlib.contextmanager
def replay_points(draws: Iterable[torch.Tensor]) -> Iterator[Iterator[torch.Tensor]]:
    """Inside the block, each :func:`uniform_points` draw is the next tensor of ``draws`` (in
    call order) instead of a random one. Yields the iterator: ``next(it, None) is None``
    afterwards tells that every draw was used."""
    it = iter(draws)
    _replayed.append(it)
    try:
        yield it
    finally:
        _replayed.pop()


def point_sample(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``features [M, C, H, W]`` at ``coords [M, P, 2]`` (normalised
    ``(x, y)`` in [0, 1]) -> ``[M, C, P]``; points outside the map read zero."""
    if features.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != features.shape[0]:
        raise ValueError(
            f"point_sample: features must be [M, C, H, W] and coords [M, P, 2] with the same M, "
            f"got {tuple(features.shape)} and {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(features.dtype)  # [M, P, 1, 2]
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the boundary)."""
    return -logits.abs()


def importance_sample_points(
    coarse_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor] = logit_uncertainty,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``[M, P, 2]`` sampling coordinates for each of the ``M`` masks of ``coarse_logits
    [M, 1, H, W]`` (see the module doc). Runs without gradient.

    Args:
        num_points: N, points per mask.
        oversample_ratio: k >= 1, uniform candidates drawn per point.
        importance_sample_ratio: beta in [0, 1], fraction of the N points taken from
            the most uncertain candidates.
    """
    if coarse_logits.dim() != 4 or coarse_logits.shape[1] != 1:
        raise ValueError(f"importance_sample_points: coarse_logits must be [M, 1, H, W], got {tuple(coarse_logits.shape)}")
    if num_points < 1:
        raise ValueError(f"importance_sample_points: num_points must be >= 1, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"importance_sample_points: oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_points: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = coarse_logits.shape[0]
    device, dtype = coarse_logits.device, coarse_logits.dtype
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    with torch.no_grad():
        chosen = []
        if num_uncertain > 0:
            num_candidates = max(int(num_points * oversample_ratio), num_uncertain)
            candidates = uniform_points(num_masks, num_candidates, device, dtype, generator)
            uncertainty = uncertainty_fn(point_sample(coarse_logits.detach(), candidates))[:, 0]  # [M, kN]
            top = uncertainty.topk(num_uncertain, dim=1).indices
            chosen.append(candidates.gather(1, top[..., None].expand(-1, -1, 2)))
        if num_random > 0:
            chosen.append(uniform_points(num_masks, num_random, device, dtype, generator))
        return torch.cat(chosen, dim=1)


def box_points_to_image(coords: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Points given in each box's frame (``[M, P, 2]`` normalised ``(x, y)``, (0, 0) =
    the box's top-left corner) -> normalised coordinates of an ``(H, W)`` image; boxes
    ``[M, 4]`` XYXY in pixels. For masks predicted inside boxes (Mask Frozen-DETR)."""
    height, width = image_size
    origin = boxes[:, None, :2]
    size = (boxes[:, None, 2:] - boxes[:, None, :2]).clamp(min=0)
    scale = torch.tensor([width, height], dtype=coords.dtype, device=coords.device)
    return (origin + coords * size) / scale
