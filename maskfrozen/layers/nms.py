"""Soft-NMS (Bodla et al., ICCV 2017), as mmcv's ``soft_nms`` / ``batched_nms`` compute it
(mmcv 1.x, the post-processing of the official Co-DINO): torchvision has hard NMS only.

:func:`soft_nms`, greedy over the boxes: take the highest remaining score (the first of equal
ones in the current order), keep it with its score at that moment, then decay the score of
every remaining box by its IoU ``o`` with it - ``linear``: ``1 - o`` where ``o >= iou_threshold``;
``gaussian``: ``exp(-o^2 / sigma)``; ``naive``: 0 where ``o >= iou_threshold`` (hard NMS) - and
drop every box whose score is then below ``min_score`` (mmcv moves the last remaining box into
its place, which decides the order among later equal scores; reproduced here). IoU without the
+1 pixel offset.

:func:`batched_soft_nms`: per class, by shifting each class's boxes by ``class * (max
coordinate + 1)`` so that boxes of different classes never overlap (mmcv's ``batched_nms``).
"""
from typing import List, Tuple

import torch

__all__ = ["soft_nms", "batched_soft_nms", "SOFT_NMS_METHODS"]

SOFT_NMS_METHODS = ("naive", "linear", "gaussian")


def _decay(iou: torch.Tensor, method: str, iou_threshold: float, sigma: float) -> torch.Tensor:
    if method == "linear":
        return torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sigma)
    return torch.where(iou >= iou_threshold, torch.zeros_like(iou), torch.ones_like(iou))


def _iou_with(box: torch.Tensor, boxes: torch.Tensor, area: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """IoU of one XYXY ``box`` with ``boxes [M, 4]`` (areas given)."""
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area + areas - inter)


def _compact(segment: List[int], dropped: set) -> List[int]:
    """mmcv's removal of low scores from a segment of the order: a dropped slot takes the
    last remaining element, which is checked in its turn."""
    end, pos = len(segment), 0
    while pos < end:
        if segment[pos] in dropped:
            segment[pos] = segment[end - 1]
            end -= 1
        else:
            pos += 1
    return segment[:end]


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             min_score: float = 1e-3, method: str = "linear") -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of ``boxes [N, 4]`` (XYXY) with ``scores [N]`` (see module doc).

    Returns the kept indices into the inputs, in selection order, and their decayed scores.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method {method!r}: expected one of {SOFT_NMS_METHODS}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"soft_nms: boxes [N, 4] and scores [N] expected, got {tuple(boxes.shape)} and "
                         f"{tuple(scores.shape)}")
    current = scores.clone()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = torch.arange(len(boxes), device=boxes.device)
    i, live = 0, len(boxes)
    while i < live:
        best = i + int(torch.argmax(current[order[i:live]]))  # the first maximum (mmcv's strict comparison)
        if best != i:
            order[[i, best]] = order[[best, i]]
        top, rest = order[i], order[i + 1:live]
        if len(rest):
            iou = _iou_with(boxes[top], boxes[rest], areas[top], areas[rest])
            current[rest] = current[rest] * _decay(iou, method, iou_threshold, sigma)
            dropped = current[rest] < min_score
            if bool(dropped.any()):
                kept = _compact(rest.tolist(), set(rest[dropped].tolist()))
                order = torch.cat([order[:i + 1], torch.tensor(kept, dtype=order.dtype, device=order.device),
                                   order[live:]])
                live = i + 1 + len(kept)
        i += 1
    keep = order[:live]
    return keep, current[keep]


def batched_soft_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float = 0.3,
                     sigma: float = 0.5, min_score: float = 1e-3,
                     method: str = "linear") -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`soft_nms` within each class (``classes [N]`` int): kept indices and decayed scores."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    shift = classes.to(boxes.dtype) * (boxes.max() + 1)
    return soft_nms(boxes + shift[:, None], scores, iou_threshold, sigma, min_score, method)
