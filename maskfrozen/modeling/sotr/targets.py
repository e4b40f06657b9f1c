"""SOLO-style targets and SOTR's losses (Sec. 3.2-3.3; SOLO, Wang et al. 2020).

An object goes to every level whose scale range ``[lo, hi]`` holds ``sqrt(w h)`` of its box.
On that level's ``N x N`` grid over the padded image, its positive cells are the centre
region: the cells within ``sigma * half box`` of its centre of mass, limited to the 3x3 cells
around the centre cell. Each positive cell is trained to classify the object (focal loss over
all cells, ``/ (num_pos + 1)``) and its dynamic kernel to produce the object's mask (dice,
mean over positives).
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from maskfrozen.modeling.criterion.mask_losses import dice_loss

from .head import dynamic_conv

__all__ = ["LevelTargets", "centre_region", "solo_level_targets", "SOTRLoss"]


@dataclass
class LevelTargets:
    """Targets of one image at one level: ``labels [N, N]`` (``K`` = background) and
    ``gt_index [N, N]`` (the object of each positive cell, -1 elsewhere)."""

    labels: torch.Tensor
    gt_index: torch.Tensor


def _cell(v: float, size: float, n: int) -> int:
    return int(math.floor(v / size * n))


def centre_region(cy: float, cx: float, half_h: float, half_w: float, image_size: Tuple[int, int],
                  n: int) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` inclusive cell range of an object on an ``n x n`` grid
    over ``image_size``: the centre region ``(cy, cx) +- (half_h, half_w)`` clipped to the
    3x3 cells around the centre cell."""
    h, w = image_size
    ch, cw = min(_cell(cy, h, n), n - 1), min(_cell(cx, w, n), n - 1)
    top = max(0, _cell(cy - half_h, h, n), ch - 1)
    bottom = min(n - 1, _cell(cy + half_h, h, n), ch + 1)
    left = max(0, _cell(cx - half_w, w, n), cw - 1)
    right = min(n - 1, _cell(cx + half_w, w, n), cw + 1)
    return top, bottom, left, right


def _centres_of_mass(masks: torch.Tensor) -> torch.Tensor:
    """``[T, H, W]`` bool -> ``[T, 2]`` (y, x) pixel centres of mass (pixel centres at +0.5)."""
    m = masks.float()
    area = m.sum((1, 2)).clamp(min=1.0)
    ys = torch.arange(m.shape[1], dtype=m.dtype, device=m.device) + 0.5
    xs = torch.arange(m.shape[2], dtype=m.dtype, device=m.device) + 0.5
    return torch.stack([(m.sum(2) * ys).sum(1) / area, (m.sum(1) * xs).sum(1) / area], 1)


def solo_level_targets(boxes: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, num_grids: Sequence[int],
                       scale_ranges: Sequence[Sequence[float]], sigma: float, num_classes: int) -> List[LevelTargets]:
    """Per-level targets of one image. ``boxes [T, 4]`` XYXY pixels, ``masks [T, H, W]``
    bool over the padded image (the grid covers ``H x W``), ``labels [T]``. Objects are
    written in order (a later one overwrites a shared cell); empty masks are skipped."""
    size = tuple(masks.shape[-2:])
    scales = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt().tolist()
    centres = _centres_of_mass(masks).tolist() if len(masks) else []
    nonempty = masks.flatten(1).any(1).tolist() if len(masks) else []
    out = []
    for n, (lo, hi) in zip(num_grids, scale_ranges):
        cls = torch.full((n, n), num_classes, dtype=torch.long, device=labels.device)
        idx = torch.full((n, n), -1, dtype=torch.long, device=labels.device)
        for t, scale in enumerate(scales):
            if not (lo <= scale <= hi and nonempty[t]):
                continue
            half_w, half_h = 0.5 * sigma * (boxes[t, 2] - boxes[t, 0]).item(), 0.5 * sigma * (boxes[t, 3] - boxes[t, 1]).item()
            top, bottom, left, right = centre_region(centres[t][0], centres[t][1], half_h, half_w, size, n)
            cls[top:bottom + 1, left:right + 1] = labels[t]
            idx[top:bottom + 1, left:right + 1] = t
        out.append(LevelTargets(cls, idx))
    return out


class SOTRLoss:
    """``L = lambda_cls * focal(classes) + lambda_mask * dice(masks)`` (weights 1 and 3)."""

    def __init__(self, num_classes: int, num_grids: Sequence[int], scale_ranges: Sequence[Sequence[float]],
                 sigma: float = 0.2, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 focal_weight: float = 1.0, dice_weight: float = 3.0):
        self.num_classes, self.num_grids, self.scale_ranges, self.sigma = num_classes, list(num_grids), scale_ranges, sigma
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight

    def __call__(self, logits: List[torch.Tensor], kernels: List[torch.Tensor], mask_feature: torch.Tensor,
                 targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``logits[l] [B, N, N, K]``, ``kernels[l] [B, N, N, D]``, ``mask_feature [B, D, h, w]``,
        ``targets[b]``: ``boxes`` (XYXY), ``labels``, ``masks`` (bool, padded image size)."""
        all_labels, pred_masks, gt_masks = [], [], []
        for b, target in enumerate(targets):
            levels = solo_level_targets(target["boxes"], target["masks"], target["labels"], self.num_grids,
                                        self.scale_ranges, self.sigma, self.num_classes)
            all_labels.append(torch.cat([t.labels.flatten() for t in levels]))
            index = torch.cat([t.gt_index.flatten() for t in levels])
            cell_kernels = torch.cat([k[b].flatten(0, 1) for k in kernels])
            positive = index >= 0
            pred_masks.append(dynamic_conv(mask_feature[b], cell_kernels[positive]))
            gt_masks.append(downsample_masks(target["masks"], mask_feature.shape[-2:])[index[positive]])
        return self._losses(logits, kernels, torch.stack(all_labels), torch.cat(pred_masks), torch.cat(gt_masks))

    def _losses(self, logits, kernels, labels: torch.Tensor, pred_masks: torch.Tensor,
                gt_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        flat_logits = torch.cat([x.flatten(1, 2) for x in logits], 1)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(flat_logits.dtype)
        num_pos = len(pred_masks)
        loss_cls = sigmoid_focal_loss(flat_logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        loss_cls = loss_cls / (num_pos + 1)
        if num_pos:
            loss_mask = dice_loss(pred_masks.flatten(1), gt_masks.flatten(1), num_pos)
        else:  # keeps every kernel parameter in the graph
            loss_mask = sum(k.sum() for k in kernels) * 0.0 + pred_masks.sum() * 0.0
        return {"loss_cls": self.focal_weight * loss_cls, "loss_mask": self.dice_weight * loss_mask}


def downsample_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[T, H, W]`` bool -> ``[T, h, w]`` float {0, 1} at the mask-feature size (bilinear, >= 0.5)."""
    if len(masks) == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    small = F.interpolate(masks[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return (small >= 0.5).float()
