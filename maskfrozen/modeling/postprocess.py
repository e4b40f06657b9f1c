"""Instance post-processing shared by the query-based mask models (Mask Frozen-DETR,
Mask2Former, FastInst): top-k selection, mask-quality scores, boxes from masks, and
resizing to the requested output size."""
from typing import Tuple

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


def instances_to_output_size(
    instances: Instances, output_height: int, output_width: int, mask_threshold: float = 0.5
) -> Instances:
    """Rescale predictions from the network input size to the requested output size.

    Boxes are scaled and clipped and empty boxes dropped (detectron2's
    ``detector_postprocess``). Masks may be given as ``pred_masks`` ``[N, 1, M, M]`` RoI
    probabilities (pasted into their boxes at the output size) or as
    ``pred_mask_probs`` ``[N, h, w]`` probabilities over the input image (resized
    bilinearly); either ends as boolean ``pred_masks [N, H_out, W_out]``.
    """
    results = detector_postprocess(instances, output_height, output_width, mask_threshold)
    if results.has("pred_mask_probs"):
        probs = results.pred_mask_probs
        results.remove("pred_mask_probs")
        if len(probs):
            probs = F.interpolate(probs[:, None], size=(output_height, output_width), mode="bilinear", align_corners=False)[:, 0]
        else:
            probs = probs.new_zeros((0, output_height, output_width))
        results.pred_masks = probs > mask_threshold
    return results
