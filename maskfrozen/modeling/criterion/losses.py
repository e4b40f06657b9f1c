"""Per-set losses and pairwise matching costs of query-based detectors.

Every loss takes the predictions of ONE query set ``[B, Q, ...]``, the targets and
the matching ``indices`` (list over images of ``(query_idx, target_idx)``) and returns
a sum normalised by ``num_boxes`` (the number of ground-truth objects, as in DETR).
Every cost returns a ``[Q, T]`` matrix for one image. Mask losses/costs (point-sampled
BCE, dice) belong next to these and are used through the same interfaces.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, generalized_box_iou_loss

from .point_sampling import point_sample

__all__ = [
    "Indices",
    "matched_query_index",
    "matched_targets",
    "class_loss_focal",
    "class_loss_quality_focal",
    "class_loss_softmax",
    "box_losses",
    "class_cost_focal",
    "class_cost_softmax",
    "box_l1_cost",
    "giou_cost",
    "location_cost",
]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def matched_query_index(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
    """(batch_idx, query_idx) of every matched query, concatenated over images."""
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    return batch_idx, query_idx


def matched_targets(targets: Sequence[Dict[str, torch.Tensor]], indices: Indices, key: str) -> torch.Tensor:
    """``targets[i][key]`` of every matched target, concatenated over images (query order)."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)])


def _target_classes(logits: torch.Tensor, targets, indices: Indices, background: int) -> torch.Tensor:
    """``[B, Q]`` class of every query: its matched label, else ``background``."""
    classes = torch.full(logits.shape[:2], background, dtype=torch.int64, device=logits.device)
    if len(indices):
        classes[matched_query_index(indices)] = matched_targets(targets, indices, "labels").to(logits.device)
    return classes


def class_loss_focal(
    logits: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    indices: Indices,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss over all queries x classes, summed / num_boxes
    (Deformable-DETR: unmatched queries are negatives for every class)."""
    num_classes = logits.shape[-1]
    classes = _target_classes(logits, targets, indices, background=num_classes)
    onehot = F.one_hot(classes, num_classes + 1)[..., :num_classes].to(logits.dtype)
    return sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def class_loss_quality_focal(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    indices: Indices,
    num_boxes: float,
    beta: float = 2.0,
) -> torch.Tensor:
    """Quality focal loss (GFL, Li et al. 2020; mmdet's ``QualityFocalLoss``, the official
    Co-DINO class loss), summed / num_boxes: every query x class is a negative with
    ``BCE(x, 0) * sigmoid(x)^beta``, except each matched query's GT class, whose target is the
    IoU ``s`` of its (detached) predicted box with the GT box: ``BCE(x, s) * |s - sigmoid(x)|^beta``."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    if len(indices) and sum(len(q) for q, _ in indices):
        batch_idx, query_idx = matched_query_index(indices)
        labels = matched_targets(targets, indices, "labels").to(logits.device)
        pred = box_cxcywh_to_xyxy(pred_boxes[batch_idx, query_idx].detach())
        gt = box_cxcywh_to_xyxy(matched_targets(targets, indices, "boxes").to(pred))
        lt, rb = torch.maximum(pred[:, :2], gt[:, :2]), torch.minimum(pred[:, 2:], gt[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = (pred[:, 2:] - pred[:, :2]).prod(-1) + (gt[:, 2:] - gt[:, :2]).prod(-1) - inter
        iou = (inter / union.clamp(min=1e-6)).to(logits.dtype)  # mmdet's bbox_overlaps
        x = logits[batch_idx, query_idx, labels]
        positive = F.binary_cross_entropy_with_logits(x, iou, reduction="none") * (iou - x.sigmoid()).abs().pow(beta)
        loss = loss.index_put((batch_idx, query_idx, labels), positive)
    return loss.sum() / num_boxes


def class_loss_softmax(
    logits: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    indices: Indices,
    num_boxes: float,
    eos_coef: float = 0.1,
) -> torch.Tensor:
    """Softmax cross-entropy with a "no object" class (last logit) down-weighted by
    ``eos_coef`` (DETR / Mask2Former); a weighted mean, so ``num_boxes`` is unused."""
    num_classes = logits.shape[-1] - 1
    classes = _target_classes(logits, targets, indices, background=num_classes)
    weight = torch.ones(num_classes + 1, dtype=logits.dtype, device=logits.device)
    weight[-1] = eos_coef
    return F.cross_entropy(logits.transpose(1, 2), classes, weight)


def box_losses(
    pred_boxes: torch.Tensor,
    targets: Sequence[Dict[str, torch.Tensor]],
    indices: Indices,
    num_boxes: float,
) -> Dict[str, torch.Tensor]:
    """L1 and (1 - GIoU) between matched predicted and target (cx, cy, w, h) boxes,
    each summed / num_boxes: ``{"loss_bbox", "loss_giou"}``."""
    src = pred_boxes[matched_query_index(indices)]
    tgt = matched_targets(targets, indices, "boxes").to(src)
    if src.numel() == 0:
        zero = pred_boxes.sum() * 0.0  # keeps the graph so every parameter gets a grad
        return {"loss_bbox": zero, "loss_giou": zero}
    loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    loss_giou = generalized_box_iou_loss(
        box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), reduction="sum"
    ) / num_boxes
    return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


# ----------------------------------------------------------------------------- costs
def class_cost_focal(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """``[Q, K]`` logits, ``[T]`` labels -> ``[Q, T]`` focal cost: the focal loss of
    predicting the label as positive minus that of predicting it as negative."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


def class_cost_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[Q, K+1]`` logits (last = no object) -> ``[Q, T]`` cost ``-p(label)``."""
    return -logits.softmax(-1)[:, labels]


def box_l1_cost(pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
    """``[Q, 4]``, ``[T, 4]`` -> ``[Q, T]`` L1 distance of (cx, cy, w, h)."""
    return torch.cdist(pred_boxes, tgt_boxes, p=1)


def giou_cost(pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
    """``[Q, 4]``, ``[T, 4]`` (cx, cy, w, h) -> ``[Q, T]`` cost ``-GIoU``."""
    return -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))


def location_cost(locations: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """FastInst's location cost: ``[Q, 2]`` normalised (x, y) query locations, ``[T, H, W]``
    target masks -> ``[Q, T]``, -1 where the location lies inside the mask (bilinear read
    > 0), else 0: with a large weight only queries inside an object can be matched to it."""
    if len(masks) == 0:
        return locations.new_zeros(len(locations), 0)
    coords = locations[None].expand(len(masks), -1, -1)
    inside = point_sample(masks[:, None].to(locations.dtype), coords)[:, 0] > 0  # [T, Q]
    return -inside.t().to(locations.dtype)
