"""Training losses of the Mask Frozen-DETR mask network.

Assignment (documented choice): each image's GT objects are matched one-to-one to its N
selected detector queries by the shared :class:`HungarianMatcher` with the detector's
own box costs (focal class, L1, GIoU on the frozen predictions), i.e. a GT mask goes to
the query that the detector's training objective would have assigned to that object.
Unmatched queries get no mask loss; unmatched GTs (not among the top N) are ignored.

Losses on matched queries, each summed and divided by the number of GT masks:
point-sampled sigmoid BCE and dice (importance sampling: N points, oversample k,
importance ratio beta), and the mask-IoU regression (squared error) of the scoring head,
whose target is the IoU between the thresholded predicted mask, pasted into the image,
and the GT mask.
"""
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.modeling.criterion.mask_losses import point_mask_losses
from maskfrozen.modeling.criterion.matcher import HungarianMatcher
from maskfrozen.modeling.criterion.point_sampling import point_sample
from maskfrozen.modeling.criterion.set_criterion import num_boxes_across_ranks

from .mask_network import MaskPredictions
from .roi_ops import box_points_to_image, mask_iou, paste_roi_masks

__all__ = ["MaskFrozenCriterion", "predicted_binary_masks", "mask_iou_targets"]


def predicted_binary_masks(preds: MaskPredictions, index: torch.Tensor, image_size: Tuple[int, int],
                           threshold: float = 0.5) -> torch.Tensor:
    """``[M, H, W]`` bool masks of the predictions ``index`` over the padded input image."""
    probs = preds.logits[index].sigmoid()
    if preds.region == "box":
        return paste_roi_masks(probs[:, 0], preds.boxes[index], image_size, threshold)
    return F.interpolate(probs, size=image_size, mode="bilinear", align_corners=False)[:, 0] > threshold


def mask_iou_targets(preds: MaskPredictions, index: torch.Tensor, gt_masks: torch.Tensor,
                     threshold: float = 0.5) -> torch.Tensor:
    """Targets of the scoring head: IoU of each thresholded predicted mask with its GT
    mask ``gt_masks [M, H, W]`` (padded input frame)."""
    with torch.no_grad():
        return mask_iou(predicted_binary_masks(preds, index, tuple(gt_masks.shape[-2:]), threshold), gt_masks)


class MaskFrozenCriterion(nn.Module):
    """See the module doc. ``loss_weights`` keys: ``loss_mask``, ``loss_dice``, ``loss_mask_iou``."""

    def __init__(self, matcher: HungarianMatcher, loss_weights: Mapping[str, float], num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.matcher = matcher
        self.loss_weights = dict(loss_weights)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def match(self, selected: Mapping[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]):
        """Flat indices (into the B*N predictions) of the matched queries, and their GT masks."""
        num_queries = selected["pred_logits"].shape[1]
        indices = self.matcher(selected, targets)
        flat = torch.cat([q + b * num_queries for b, (q, _) in enumerate(indices)]).to(selected["pred_logits"].device)
        masks = torch.cat([t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)])
        return flat, masks

    def forward(self, preds: MaskPredictions, selected: Mapping[str, torch.Tensor],
                targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Args:
            preds: mask network output for the B*N selected queries.
            selected: the matcher's view of those queries, ``pred_logits [B, N, K]``,
                ``pred_boxes [B, N, 4]`` (normalised cx, cy, w, h).
            targets: per image ``labels [T]``, ``boxes [T, 4]`` (normalised cx, cy, w, h)
                and ``masks [T, H, W]`` bool over the padded input image.
        """
        flat, gt_masks = self.match(selected, targets)
        num_masks = num_boxes_across_ranks(targets, preds.logits.device)
        gt = gt_masks[:, None].to(preds.logits.dtype)
        image_size = tuple(gt_masks.shape[-2:])
        boxes = preds.boxes[flat]
        if preds.region == "box":
            sample = lambda c: point_sample(gt, box_points_to_image(c, boxes, image_size))[:, 0]  # noqa: E731
        else:
            sample = lambda c: point_sample(gt, c)[:, 0]  # noqa: E731  logits cover the padded image
        losses = point_mask_losses(preds.logits[flat], sample, num_masks, self.num_points, self.oversample_ratio,
                                   self.importance_sample_ratio)
        if preds.iou is not None:
            target_iou = mask_iou_targets(preds, flat, gt_masks)
            losses["loss_mask_iou"] = ((preds.iou[flat] - target_iou) ** 2).sum() / num_masks
        return {k: v * self.loss_weights.get(k, 1.0) for k, v in losses.items()}
