"""Training losses of the Mask Frozen-DETR mask network, through the shared criterion.

Assignment (documented choice): each image's GT objects are matched one-to-one to its N
selected detector queries by the detector's own Hungarian matcher (its focal class, L1
and GIoU costs on the frozen predictions), i.e. a GT mask goes to the query that the
detector's training objective would have assigned to that object. Unmatched queries get
no mask loss; unmatched GTs (not among the top N) are ignored.

Loss terms on the matched queries, each summed and divided by the number of GT masks:
the shared point-sampled sigmoid BCE and dice ("masks": importance sampling with N
points, oversample k, importance ratio beta; masks predicted inside boxes read their
targets through the box) and, with the scoring head, the mask-IoU regression
("mask_iou", squared error) whose target is the IoU between the thresholded predicted
mask, pasted into the image, and the GT mask.
"""
from typing import Dict, Mapping, Sequence

import torch
from detectron2.config import CfgNode

from maskfrozen.modeling.criterion import HungarianMatcher, SetCriterion, matched_query_index, matched_targets

from .roi_ops import mask_iou

__all__ = ["MaskIoULoss", "build_mask_frozen_criterion"]


class MaskIoULoss:
    """The "mask_iou" loss term: ``sum (iou_pred - IoU(mask > t, GT))^2 / num_masks``."""

    def __init__(self, region, threshold: float = 0.5):
        self.region = region
        self.threshold = threshold

    def targets(self, outputs: Mapping[str, torch.Tensor], gt_masks: torch.Tensor, batch_idx, query_idx):
        """IoU of each matched, thresholded predicted mask with its GT mask ``[M, H, W]``."""
        logits = outputs["pred_masks"][batch_idx, query_idx][:, None]
        boxes = outputs["pred_mask_boxes"][batch_idx, query_idx] if "pred_mask_boxes" in outputs else None
        with torch.no_grad():
            binary = self.region.binary_masks(logits, boxes, tuple(gt_masks.shape[-2:]), self.threshold)
            return mask_iou(binary, gt_masks)

    def __call__(self, outputs, targets: Sequence[Dict[str, torch.Tensor]], indices, num_boxes: float):
        batch_idx, query_idx = matched_query_index(indices)
        gt_masks = matched_targets(targets, indices, "masks")
        predicted = outputs["pred_mask_iou"][batch_idx, query_idx]
        target_iou = self.targets(outputs, gt_masks, batch_idx, query_idx).to(predicted.dtype)
        return {"loss_mask_iou": ((predicted - target_iou) ** 2).sum() / num_boxes}


def build_mask_frozen_criterion(cfg: CfgNode, matcher: HungarianMatcher, region) -> SetCriterion:
    """The shared criterion with the mask terms (+ "mask_iou" when the scoring head is on)
    and the detector's ``matcher``."""
    m = cfg.MODEL.MASK_FROZEN
    losses = ("masks", "mask_iou") if m.MASK_SCORING.ENABLED else ("masks",)
    return SetCriterion(
        matcher, {"loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT, "loss_mask_iou": m.MASK_IOU_WEIGHT},
        losses=losses, num_points=m.NUM_POINTS, oversample_ratio=m.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO,
        extra_loss_fns={"mask_iou": MaskIoULoss(region, m.TEST.MASK_THRESHOLD)})
