"""Instance post-processing shared by the query-based mask models (Mask Frozen-DETR,
Mask2Former, FastInst): top-k selection, mask-quality scores, boxes from masks, and
resizing to the requested output size."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = [
    "top_queries",
    "top_query_class_pairs",
    "mask_prob_score",
    "boxes_from_masks",
    "instances_to_output_size",
]


def top_queries(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` queries with the highest class score, best first: one detection per
    query. ``scores [..., Q, K]`` -> (query index, label, score), each ``[..., k]``."""
    best, labels = scores.max(-1)
    top = best.topk(min(k, best.shape[-1]), dim=-1)
    return top.indices, labels.gather(-1, top.indices), top.values


def top_query_class_pairs(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` over all (query, class) pairs of one image (DETR/Mask2Former inference:
    a query may be reported with several classes). ``scores [Q, K]`` -> (query index,
    label, score), each ``[k]``."""
    num_classes = scores.shape[-1]
    top = scores.flatten().topk(min(k, scores.numel()))
    return top.indices // num_classes, top.indices % num_classes, top.values


def mask_prob_score(mask_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean probability inside each predicted mask, ``sum(M[M > t]) / sum(M > t)``
    (Mask Frozen-DETR Sec. 4.1, Mask2Former); 0 for an empty mask. ``[N, ...]`` -> ``[N]``."""
    probs = mask_probs.flatten(1)
    inside = (probs > threshold).to(probs.dtype)
    return (probs * inside).sum(1) / inside.sum(1).clamp(min=1.0)


def boxes_from_masks(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes of ``[N, H, W]`` binary masks (zeros for an empty mask)."""
    return BitMasks(masks.bool()).get_bounding_boxes()


def _resized_masks(probs: torch.Tensor, height: int, width: int, threshold: float) -> torch.Tensor:
    """``[N, h, w]`` probabilities -> ``[N, height, width]`` bool (bilinear; same size: as is)."""
    if len(probs) and tuple(probs.shape[-2:]) != (height, width):
        probs = F.interpolate(probs[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    elif not len(probs):
        probs = probs.new_zeros((0, height, width))
    return probs > threshold


def instances_to_output_size(
    instances: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5,
    shared_mask_probs: Optional[torch.Tensor] = None,
) -> Instances:
    """Rescale predictions from the network input size to the requested output size.

    Boxes are scaled and clipped and empty boxes dropped (detectron2's
    ``detector_postprocess``). Masks may be given as ``pred_masks`` ``[N, 1, M, M]`` RoI
    probabilities (pasted into their boxes at the output size), as ``pred_mask_probs``
    ``[N, h, w]`` probabilities over the input image (resized bilinearly), or as
    ``shared_mask_probs [U, h, w]`` with a ``pred_mask_index [N]`` field naming each
    detection's row (one mask reported with several classes is resized once); any of them
    ends as boolean ``pred_masks [N, H_out, W_out]``.
    """
    results = detector_postprocess(instances, output_height, output_width, mask_threshold)
    if results.has("pred_mask_probs"):
        results.pred_masks = _resized_masks(results.pred_mask_probs, output_height, output_width, mask_threshold)
        results.remove("pred_mask_probs")
    elif shared_mask_probs is not None:
        masks = _resized_masks(shared_mask_probs, output_height, output_width, mask_threshold)
        results.pred_masks = masks[results.pred_mask_index]
        results.remove("pred_mask_index")
    return results
