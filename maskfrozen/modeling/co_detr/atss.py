"""ATSS auxiliary head (one-to-many assignment) for Co-DETR, written once here because
Detectron2 has no ATSS: the assignment (Zhang et al. 2020), centerness, and the focal +
centerness-weighted GIoU + centerness BCE losses. The anchors and box coding are
Detectron2's (``DefaultAnchorGenerator``, ``Box2BoxTransform``).

Assignment of one image (:func:`atss_assign`):
1. per level, the ``topk`` anchors whose centres are closest to each GT centre are its
   candidates;
2. a candidate is positive when its IoU with the GT is >= mean + std (unbiased) of the
   IoUs of that GT's candidates, and its centre lies inside the GT (by more than 0.01 px);
3. an anchor positive for several GTs goes to the one it overlaps most.

Public Co-DETR settings (the code defaults): one stacked 3x3 conv + GN + ReLU per branch,
one square anchor of side ``anchor_scale * stride`` per location, box deltas with
weights (10, 10, 5, 5) (mmdet's stds 0.1, 0.1, 0.2, 0.2), a learned scale per level, loss
weights 1 (focal), 2 (GIoU), 1 (centerness). Normalisers are this worker's: the number of
positive anchors (focal, centerness) and the sum of centerness targets (GIoU); the public
code averages them over GPUs.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Instances
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

__all__ = ["atss_assign", "centerness_target", "ATSSHead", "AuxPositives"]


@dataclass
class AuxPositives:
    """One image's positive samples of an auxiliary head, which become positive queries."""

    boxes: torch.Tensor  # [P, 4] XYXY input pixels (anchors or proposals)
    gt_index: torch.Tensor  # [P] int64, the assigned GT of each (index into the image's targets)
    features: torch.Tensor  # [P, C] the feature at each (ATSS: its location; R-CNN: mean-pooled RoI)
    # the head's negatives (background samples), from which the official code fills short
    # positive-query groups: boxes [M, 4] XYXY and features [M, C] (None: none recorded)
    negative_boxes: Optional[torch.Tensor] = None
    negative_features: Optional[torch.Tensor] = None


def atss_assign(anchors_per_level: Sequence[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS assignment (see module doc) of anchors ``[A_l, 4]`` per level (XYXY, the levels
    concatenated in this order) to ``gt_boxes [G, 4]`` (XYXY): ``[A]`` int64, the assigned
    GT index, -1 for negatives."""
    anchors = torch.cat(list(anchors_per_level))
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return assigned
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = (anchor_centres[:, None] - gt_centres[None]).pow(2).sum(-1).sqrt()  # [A, G] (mmdet's, not cdist)
    candidates, start = [], 0
    for level in anchors_per_level:
        n = level.shape[0]
        k = min(topk, n)
        candidates.append(distances[start: start + n].topk(k, dim=0, largest=False).indices + start)
        start += n
    candidates = torch.cat(candidates, 0)  # [C, G]
    candidate_ious = ious.gather(0, candidates)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    centres = anchor_centres[candidates]  # [C, G, 2]
    inside = torch.stack([centres[..., 0] - gt_boxes[:, 0], centres[..., 1] - gt_boxes[:, 1],
                          gt_boxes[:, 2] - centres[..., 0], gt_boxes[:, 3] - centres[..., 1]], -1).min(-1).values > 0.01
    positive = (candidate_ious >= threshold[None]) & inside
    gt_of = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
    best = torch.full_like(ious, -math.inf)
    best[candidates[positive], gt_of[positive]] = ious[candidates[positive], gt_of[positive]]
    best_iou, best_gt = best.max(1)
    found = best_iou > -math.inf
    assigned[found] = best_gt[found]
    return assigned


def centerness_target(anchors: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of each anchor centre in its
    GT box (FCOS/ATSS); both ``[P, 4]`` XYXY with the centres inside the boxes."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx], -1)
    tb = torch.stack([cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy], -1)
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))


def _conv_gn_relu(channels: int, num_groups: int) -> Conv2d:
    return Conv2d(channels, channels, 3, padding=1, bias=False, norm=nn.GroupNorm(num_groups, channels),
                  activation=nn.ReLU())


class ATSSHead(nn.Module):
    """ATSS head on a feature pyramid (shared over levels); see the module doc.

    ``forward(images, features, gt_instances)`` (training only) returns the unweighted-by-
    lambda losses ``{"loss_atss_cls", "loss_atss_bbox", "loss_atss_centerness"}`` (term
    weights applied) and each image's :class:`AuxPositives` (the positive anchors).
    """

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int], num_convs: int = 1,
                 num_groups: int = 32, anchor_scale: float = 8.0, topk: int = 9, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, class_weight: float = 1.0, box_weight: float = 2.0,
                 centerness_weight: float = 1.0, prior_prob: float = 0.01):
        super().__init__()
        self.num_classes, self.topk = num_classes, topk
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.weights = {"cls": class_weight, "bbox": box_weight, "centerness": centerness_weight}
        self.cls_convs = nn.ModuleList(_conv_gn_relu(channels, num_groups) for _ in range(num_convs))
        self.reg_convs = nn.ModuleList(_conv_gn_relu(channels, num_groups) for _ in range(num_convs))
        self.atss_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ParameterList(nn.Parameter(torch.tensor(1.0)) for _ in strides)
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[[anchor_scale * s] for s in strides], aspect_ratios=[[1.0]], strides=list(strides), offset=0.0)
        self.box2box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def predict(self, features: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per anchor, levels concatenated: class logits ``[N, A, K]``, deltas ``[N, A, 4]``,
        centerness logits ``[N, A]``."""
        # atss_reg and atss_centerness read the same map: one conv (bit-identical outputs; the
        # small separate convs take torch's slow path on the CPU)
        reg_heads = (self.atss_reg, self.atss_centerness)
        reg_weight, reg_bias = torch.cat([h.weight for h in reg_heads]), torch.cat([h.bias for h in reg_heads])
        logits, deltas, centerness = [], [], []
        for x, scale in zip(features, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            box, ctr = F.conv2d(reg_feat, reg_weight, reg_bias, padding=1).split([4, 1], dim=1)
            logits.append(self.atss_cls(cls_feat).flatten(2).transpose(1, 2))
            deltas.append((box * scale).flatten(2).transpose(1, 2))
            centerness.append(ctr.flatten(1))
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(centerness, 1)

    def valid_anchors(self, features: List[torch.Tensor], image_size: Tuple[int, int]) -> torch.Tensor:
        """``[A]`` bool: the anchors whose cell lies inside ``ceil(image size / stride)`` (mmdet's
        ``valid_flags`` of the image; anchors on the batch's padding are left out)."""
        h, w = image_size
        masks = []
        for f, stride in zip(features, self.anchor_generator.strides):
            mask = torch.zeros(f.shape[-2:], dtype=torch.bool, device=f.device)
            mask[: math.ceil(h / stride), : math.ceil(w / stride)] = True
            masks.append(mask.flatten())
        return torch.cat(masks)

    def assign(self, anchors_per_level: List[torch.Tensor], valid: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """:func:`atss_assign` among the valid anchors (-1 elsewhere)."""
        sizes = [len(a) for a in anchors_per_level]
        valid_levels = [a[v] for a, v in zip(anchors_per_level, valid.split(sizes))]
        assigned = torch.full_like(valid, -1, dtype=torch.int64)
        assigned[valid] = atss_assign(valid_levels, gt_boxes, self.topk)
        return assigned

    def forward(self, images, features: List[torch.Tensor],
                gt_instances: Sequence[Instances]) -> Tuple[Dict[str, torch.Tensor], List[AuxPositives]]:
        """The auxiliary-head interface (as :class:`FasterRCNNAuxHead`): ``images`` (their
        ``image_sizes``), the adapter's ``features``, per image ``gt_boxes`` (XYXY pixels) and
        ``gt_classes``. Anchors on an image's padding take no part (mmdet); its negatives for
        the positive queries include them, with zero boxes (mmdet's ``unmap``)."""
        anchors_per_level = [b.tensor for b in self.anchor_generator(features)]
        anchors = torch.cat(anchors_per_level)
        logits, deltas, centerness = self.predict(features)
        tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)  # [N, A, C]
        valid = torch.stack([self.valid_anchors(features, size) for size in images.image_sizes])
        with torch.no_grad():
            assigned = [self.assign(anchors_per_level, v, inst.gt_boxes.tensor) for v, inst in zip(valid, gt_instances)]
        cls_target = torch.zeros_like(logits)
        pos_pred, pos_anchor, pos_gt, pos_ctr, positives = [], [], [], [], []
        for i, (a, inst) in enumerate(zip(assigned, gt_instances)):
            boxes, labels = inst.gt_boxes.tensor, inst.gt_classes
            pos = torch.nonzero(a >= 0).squeeze(1)
            cls_target[i, pos, labels[a[pos]]] = 1.0
            pos_pred.append(deltas[i, pos])
            pos_anchor.append(anchors[pos])
            pos_gt.append(boxes[a[pos]])
            pos_ctr.append(centerness[i, pos])
            neg = torch.nonzero(a < 0).squeeze(1)
            negative_boxes = anchors[neg] * valid[i, neg, None].to(anchors.dtype)
            positives.append(AuxPositives(anchors[pos], a[pos], tokens[i, pos], negative_boxes, tokens[i, neg]))
        # mmdet: each image counts at least one positive
        num_pos = float(sum(max(len(p.gt_index), 1) for p in positives))
        focal = sigmoid_focal_loss(logits, cls_target, self.focal_alpha, self.focal_gamma, "none").sum(-1)
        loss_cls = (focal * valid.to(focal.dtype)).sum() / num_pos
        pos_pred, pos_anchor, pos_gt, pos_ctr = (torch.cat(x) for x in (pos_pred, pos_anchor, pos_gt, pos_ctr))
        if len(pos_gt):
            target_ctr = centerness_target(pos_anchor, pos_gt)
            boxes = self.box2box_transform.apply_deltas(pos_pred, pos_anchor)
            giou = generalized_box_iou_loss(boxes, pos_gt, reduction="none")
            loss_bbox = (giou * target_ctr).sum() / target_ctr.sum().clamp(min=1.0)
            loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr, target_ctr, reduction="sum") / num_pos
        else:  # keep every parameter in the graph (DDP)
            loss_bbox, loss_ctr = deltas.sum() * 0.0, centerness.sum() * 0.0
        losses = {"loss_atss_cls": loss_cls, "loss_atss_bbox": loss_bbox, "loss_atss_centerness": loss_ctr}
        return {k: v * self.weights[k.split("_")[-1]] for k, v in losses.items()}, positives
