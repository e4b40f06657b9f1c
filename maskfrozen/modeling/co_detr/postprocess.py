"""The test post-processing of the official Co-DETR query heads (mmdet's
``CoDeformDETRHead._get_bboxes_single``), which the detector uses when Co-DETR is on and
``MODEL.CO_DETR.TEST.POSTPROCESS`` is "mmdet":

1. the top ``k`` (query, class) pairs of the last layer's sigmoid scores: ``k`` = the number
   of queries when soft-NMS follows (Co-DINO), else ``max_detections`` (Co-Deformable-DETR);
2. their boxes in input pixels, clamped to the unpadded input image, then scaled to the
   requested output size;
3. with soft-NMS: class-wise soft-NMS (:func:`maskfrozen.layers.nms.batched_soft_nms`, the
   decayed scores replace the scores) and the first ``max_detections`` of its order.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from detectron2.structures import Boxes, Instances

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy
from maskfrozen.layers.nms import batched_soft_nms
from maskfrozen.modeling.postprocess import top_query_class_pairs

__all__ = ["SoftNMSConfig", "mmdet_detections"]


@dataclass(frozen=True)
class SoftNMSConfig:
    iou_threshold: float = 0.8
    sigma: float = 0.5
    min_score: float = 1e-3
    method: str = "linear"


def mmdet_detections(scores: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                     output_size: Tuple[int, int], max_detections: int,
                     soft_nms: "SoftNMSConfig | None" = None) -> Instances:
    """One image: ``scores [Q, K]`` (sigmoid), ``boxes [Q, 4]`` (normalised cxcywh) ->
    ``Instances(output_size)`` with ``pred_boxes``, ``scores``, ``pred_classes`` (module doc)."""
    (h, w), (out_h, out_w) = image_size, output_size
    k = scores.shape[0] if soft_nms is not None else max_detections
    query, label, score = top_query_class_pairs(scores, k)
    positive = score > 0  # mmdet's score_thr 0
    query, label, score = query[positive], label[positive], score[positive]
    xyxy = box_cxcywh_to_xyxy(boxes[query]) * boxes.new_tensor([w, h, w, h])
    xyxy = torch.stack([xyxy[:, 0].clamp(0, w), xyxy[:, 1].clamp(0, h), xyxy[:, 2].clamp(0, w),
                        xyxy[:, 3].clamp(0, h)], -1)
    xyxy = xyxy * xyxy.new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    if soft_nms is not None:
        keep, score = batched_soft_nms(xyxy, score, label, soft_nms.iou_threshold, soft_nms.sigma,
                                       soft_nms.min_score, soft_nms.method)
        keep, score = keep[:max_detections], score[:max_detections]
        xyxy, label = xyxy[keep], label[keep]
    result = Instances((out_h, out_w))
    result.pred_boxes = Boxes(xyxy)
    result.scores = score
    result.pred_classes = label
    return result
