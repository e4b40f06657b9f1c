"""Detectron2's ``RPN`` with the training-time proposal NMS stopped once enough boxes are kept.

Detectron2 (``find_top_rpn_proposals``) keeps the ``pre_nms_topk`` best anchors per level,
runs NMS on every level (torchvision's per-class loop once there are more than 1000 boxes
on the CPU) and returns the ``post_nms_topk`` best survivors over all levels. Only the
first ``post_nms_topk`` survivors of a level can be among those, and greedy NMS decides
box i from the boxes ranked above it alone (torchvision's NMS sorts stably, so on a list
already sorted by score the ranking is the list order). So NMS over the top ``m`` boxes of
a level gives exactly the first survivors of the full NMS: it runs on ``2 * post_nms_topk``
boxes and doubles ``m`` until ``post_nms_topk`` survive or the level is used up; this
holds with tied logits too. The last step, detectron2's ranking of all survivors by logit,
is an unstable sort: it orders tied logits as it likes, so when a level was cut short and
two candidate logits at or above the last one returned are equal, the full NMS runs
instead. Hence the proposals, their order and their logits are always exactly detectron2's.
On the Co-DINO shapes step (1000 candidates on the first levels, about half kept) this
halves the NMS time. Inference and GPU tensors run detectron2's code unchanged.

:class:`FusedRPNHead`: detectron2's ``StandardRPNHead`` with its two 1x1 output convs run as
one (their weights concatenated per call; same parameters, bit-identical outputs).
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import batched_nms, nonzero_tuple
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.structures import Boxes, Instances, pairwise_iou
from torchvision.ops import nms

__all__ = ["TruncatedNMSRPN", "FusedRPNHead", "FlooredLowQualityMatcher", "prefix_nms", "level_nms"]

CPU_VANILLA_NMS_MIN_NUMEL = 4000  # torchvision.ops.batched_nms loops over classes above this on the CPU


def prefix_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
               max_keep: int) -> Tuple[torch.Tensor, bool]:
    """The first ``max_keep`` indices ``nms(boxes, scores)`` keeps, for ``scores`` sorted
    in descending order (see module doc), and whether they are all it keeps."""
    total = len(scores)
    size = min(total, 2 * max_keep)
    while True:
        keep = nms(boxes[:size], scores[:size], iou_threshold)
        if len(keep) >= max_keep or size == total:
            return keep[:max_keep], size == total and len(keep) <= max_keep
        size = min(total, 2 * size)


def _tie_at_or_above(scores: torch.Tensor, floor: torch.Tensor) -> bool:
    """Whether two of the ``scores >= floor`` are equal."""
    top = scores[scores >= floor]
    return torch.unique(top).numel() != top.numel()


def level_nms(boxes: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor, iou_threshold: float,
              max_keep: int) -> torch.Tensor:
    """``detectron2.layers.batched_nms(boxes, scores, levels)[:max_keep]`` for scores sorted
    in descending order within each level (see module doc)."""
    boxes = boxes.float()
    if boxes.device.type != "cpu" or boxes.numel() <= CPU_VANILLA_NMS_MIN_NUMEL:
        return batched_nms(boxes, scores, levels, iou_threshold)[:max_keep]
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    complete = True
    for level in torch.unique(levels):
        indices = torch.where(levels == level)[0]
        keep, all_kept = prefix_nms(boxes[indices], scores[indices], iou_threshold, max_keep)
        keep_mask[indices[keep]] = True
        complete = complete and all_kept
    kept = torch.where(keep_mask)[0]
    keep = kept[scores[kept].sort(descending=True)[1]][:max_keep]
    if not complete and len(keep) and _tie_at_or_above(scores, scores[keep[-1]]):
        return batched_nms(boxes, scores, levels, iou_threshold)[:max_keep]
    return keep


def _top_per_level(proposals: List[torch.Tensor], logits: List[torch.Tensor],
                   pre_nms_topk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each level's ``pre_nms_topk`` best anchors, as detectron2 selects them: boxes
    ``[N, K, 4]``, logits ``[N, K]`` (descending within each level), level ids ``[K]``."""
    boxes, scores, levels = [], [], []
    batch = torch.arange(logits[0].shape[0], device=logits[0].device)
    for level, (proposals_l, logits_l) in enumerate(zip(proposals, logits)):
        k = min(logits_l.shape[1], pre_nms_topk)
        logits_l, order = logits_l.sort(descending=True, dim=1)
        scores.append(logits_l.narrow(1, 0, k))
        boxes.append(proposals_l[batch[:, None], order.narrow(1, 0, k)])
        levels.append(torch.full((k,), level, dtype=torch.int64, device=logits_l.device))
    return torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels)


def top_rpn_proposals(proposals: List[torch.Tensor], logits: List[torch.Tensor], image_sizes: List[Tuple[int, int]],
                      nms_thresh: float, pre_nms_topk: int, post_nms_topk: int,
                      min_box_size: float) -> List[Instances]:
    """``find_top_rpn_proposals(..., training=True)`` with :func:`level_nms`."""
    all_boxes, all_scores, all_levels = _top_per_level(proposals, logits, pre_nms_topk)
    results = []
    for boxes, scores, image_size in zip(all_boxes, all_scores, image_sizes):
        boxes, levels = Boxes(boxes), all_levels
        if not (torch.isfinite(boxes.tensor).all(dim=1) & torch.isfinite(scores)).all():
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
        boxes.clip(image_size)
        keep = boxes.nonempty(threshold=min_box_size)
        if keep.sum().item() != len(boxes):
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = level_nms(boxes.tensor, scores, levels, nms_thresh, post_nms_topk)
        result = Instances(image_size)
        result.proposal_boxes = boxes[keep]
        result.objectness_logits = scores[keep]
        results.append(result)
    return results


class TruncatedNMSRPN(RPN):
    """``RPN`` (same parameters) whose training proposals come from :func:`top_rpn_proposals`
    on CPU tensors (same results, see module doc) and whose anchors on an image's padding take
    no part in its assignment and sampling (mmdet's ``valid_flags`` with ``allowed_border=-1``,
    the official Co-DETR RPN; detectron2 assigns every anchor)."""

    @staticmethod
    def valid_anchors(anchors: List[Boxes], strides: List[int], image_size: Tuple[int, int]) -> torch.Tensor:
        """``[R]`` bool: anchors whose cell lies inside ``ceil(image size / stride)``
        (anchor centres sit on the cell corners: offset 0)."""
        h, w = image_size
        masks = []
        for level, stride in zip(anchors, strides):
            centres = level.get_centers()
            limit = centres.new_tensor([math.ceil(w / stride) * stride, math.ceil(h / stride) * stride])
            masks.append((centres < limit - stride / 2).all(1))
        return torch.cat(masks)

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """detectron2's labelling among each image's valid anchors; the others are ignored (-1)."""
        strides = self.anchor_generator.strides
        all_anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes = [], []
        for inst in gt_instances:
            valid = self.valid_anchors(anchors, strides, inst.image_size)
            labels = torch.full((len(all_anchors),), -1, dtype=torch.int8, device=all_anchors.device)
            matched_boxes = torch.zeros_like(all_anchors.tensor)
            if valid.any():
                matched_idxs, valid_labels = self.anchor_matcher(pairwise_iou(inst.gt_boxes, all_anchors[valid]))
                labels[valid] = valid_labels.to(labels.dtype)
                if len(inst.gt_boxes):
                    matched_boxes[valid] = inst.gt_boxes.tensor[matched_idxs]
            gt_labels.append(self._subsample_labels(labels))
            matched_gt_boxes.append(matched_boxes)
        return gt_labels, matched_gt_boxes

    def predict_proposals(self, anchors: List[Boxes], pred_objectness_logits: List[torch.Tensor],
                          pred_anchor_deltas: List[torch.Tensor], image_sizes: List[Tuple[int, int]]):
        if not self.training or pred_objectness_logits[0].device.type != "cpu":
            return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        with torch.no_grad():
            proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            return top_rpn_proposals(proposals, pred_objectness_logits, image_sizes, self.nms_thresh,
                                     self.pre_nms_topk[True], self.post_nms_topk[True], self.min_box_size)


class FusedRPNHead(StandardRPNHead):
    """``StandardRPNHead`` whose objectness and anchor-delta 1x1 convs run as one conv per
    level (the small separate convs take torch's slow path on the CPU)."""

    def forward(self, features: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        heads = (self.objectness_logits, self.anchor_deltas)
        weight = torch.cat([h.weight for h in heads])
        bias = torch.cat([h.bias for h in heads])
        split = [h.out_channels for h in heads]
        objectness, deltas = [], []
        for x in features:
            logits, box_deltas = F.conv2d(self.conv(x), weight, bias).split(split, dim=1)
            objectness.append(logits)
            deltas.append(box_deltas)
        return objectness, deltas


class FlooredLowQualityMatcher(Matcher):
    """Detectron2's ``Matcher`` with low-quality matches (each GT's highest-IoU anchors, ties
    included, become positives below the positive threshold) only where that IoU is at
    least ``min_quality``: mmdet's ``MaxIoUAssigner(min_pos_iou=...)`` of the official RPN
    (0.3). ``min_quality=0`` is detectron2's own rule."""

    def __init__(self, thresholds, labels, min_quality: float):
        super().__init__(thresholds, labels, allow_low_quality_matches=True)
        self.min_quality = min_quality

    def set_low_quality_matches_(self, match_labels: torch.Tensor, match_quality_matrix: torch.Tensor) -> None:
        highest = match_quality_matrix.max(dim=1).values[:, None]
        _, best = nonzero_tuple((match_quality_matrix == highest) & (highest >= self.min_quality))
        match_labels[best] = 1
