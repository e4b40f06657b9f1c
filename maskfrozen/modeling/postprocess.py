"""Instance post-processing shared by the mask models (Mask Frozen-DETR, Mask2Former, FastInst,
SOTR): top-k selection, mask-quality scores, mask logits at the output size, boxes from masks
(optionally ignoring stray fragments), and resizing to the requested output size."""
import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, Instances
from scipy import ndimage

__all__ = [
    "top_queries",
    "top_query_class_pairs",
    "mask_prob_score",
    "mask_logits_at_output_size",
    "boxes_from_masks",
    "main_components",
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


def mask_logits_at_output_size(mask_logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
                               output_size: Tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` mask logits over the padded batch image (at the mask stride) -> ``[N, H_out,
    W_out]`` logits at the requested output size, as the official Mask2Former / FastInst
    inference: bilinear to the padded input size, the image cropped out of the padding, bilinear
    to the output size (detectron2's ``sem_seg_postprocess``)."""
    if not len(mask_logits):
        return mask_logits.new_zeros((0, *output_size))
    padded = F.interpolate(mask_logits[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(padded, tuple(image_size), *output_size)


# components are labelled on masks max-pooled to at most this many cells a side (fragments closer
# than one pooled cell join their neighbour); areas are counted at the full resolution
_COMPONENT_GRID = 160
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def main_components(masks: torch.Tensor, min_share: float) -> torch.Tensor:
    """``[N, H, W]`` binary masks without their stray fragments: of each mask's 8-connected
    components, the largest and every one holding at least ``min_share`` of the mask's area are
    kept (``min_share`` 1: the largest component only, or the largest ones when several tie;
    0: all). Components are found on the
    mask max-pooled to at most 160 cells a side, so pieces closer than one pooled cell count as
    one."""
    masks = masks.bool()
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"main_components: min_share must be in [0, 1], got {min_share}")
    if min_share == 0.0 or not masks.numel():
        return masks
    height, width = masks.shape[-2:]
    cell = max(1, math.ceil(max(height, width) / _COMPONENT_GRID))
    kept = masks.clone()
    for i, mask in enumerate(masks):
        area = F.avg_pool2d(mask[None, None].float(), cell, stride=cell, ceil_mode=True,
                            count_include_pad=False, divisor_override=1)[0, 0]  # full-resolution pixels per cell
        labels, count = ndimage.label((area > 0).cpu().numpy(), structure=_EIGHT_CONNECTED)
        if count < 2:
            continue
        labels = torch.from_numpy(labels).to(mask.device)
        sizes = torch.zeros(count + 1, dtype=area.dtype, device=mask.device).index_add_(0, labels.flatten(),
                                                                                     area.flatten())[1:]
        keep = (sizes >= min_share * sizes.sum()) | (sizes == sizes.max())
        keep_cells = F.pad(keep, (1, 0))[labels]  # label 0 = background, never kept
        full = keep_cells.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:height, :width]
        kept[i] = mask & full
    return kept


def boxes_from_masks(masks: torch.Tensor, min_component_share: float = 0.0) -> Boxes:
    """XYXY boxes of ``[N, H, W]`` binary masks (zeros for an empty mask): tight around the
    whole mask (``min_component_share`` 0, the default), or around its main connected components
    only, stray fragments ignored (:func:`main_components`; 1: the largest component only)."""
    return BitMasks(main_components(masks, min_component_share)).get_bounding_boxes()


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
