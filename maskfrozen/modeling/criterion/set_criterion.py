"""One set criterion for every query set of every model.

A model describes what to supervise as a list of :class:`QuerySet` entries; the
criterion computes the caller's chosen loss terms (``losses=["labels", "boxes",
"masks"]`` plus any registered extra term) for each entry and each of its decoder
layers. Only an entry's targets, assignment and weight differ:

=========================  ==========================  ======================  ===========
entry (who builds it)      targets                     assignment              suffix
=========================  ==========================  ======================  ===========
main / deep supervision    GT                          Hungarian (per layer)   ``""``
DETR encoder proposals     GT (labels 0 if agnostic)   Hungarian               ``_enc``
DINO denoising             GT                          fixed (its indices)     ``_dn``
H-DETR one-to-many         GT repeated k times         Hungarian               ``_one2many``
FastInst GT-guided set     GT                          fixed (last layer's)    ``_gt``
Co-DETR positive queries   the aux head's GTs          fixed                   ``_pos{i}``
Mask Frozen-DETR           GT (+ masks)                Hungarian, box costs    ``""``
=========================  ==========================  ======================  ===========

Each layer of an entry gives keys ``loss_<term><suffix>`` (last layer) and
``loss_<term><suffix>_aux{i}`` (its ``aux_outputs``), already multiplied by
``loss_weights[loss_<term>] * entry.weight``; the total loss is their sum.

Outputs of a query set (``[B, Q, ...]``): ``pred_logits`` (focal: K logits; softmax:
K + 1, last = no object), ``pred_boxes`` (normalised cx, cy, w, h), ``pred_masks``
(mask logits over the padded image, any resolution; or, with ``pred_mask_boxes`` XYXY
input pixels, each over its own box), ``aux_outputs`` (a list of such dicts).
Targets per image: ``labels [T]``, ``boxes [T, 4]``, ``masks [T, H, W]`` (padded image).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.utils import comm
from torch import nn

from .losses import (Indices, box_losses, class_loss_focal, class_loss_quality_focal, class_loss_softmax,
                     matched_query_index, matched_targets)
from .mask_losses import point_mask_losses
from .matcher import HungarianMatcher
from .point_sampling import box_points_to_image, point_sample

__all__ = [
    "SetCriterion",
    "QuerySet",
    "LossFn",
    "LOSS_TERMS",
    "repeat_targets",
    "class_agnostic_targets",
    "num_boxes_across_ranks",
]

Targets = Sequence[Dict[str, torch.Tensor]]
# (query set outputs, targets, indices, num_boxes) -> {"loss_<name>": tensor}
LossFn = Callable[[Mapping[str, torch.Tensor], Targets, Indices, float], Dict[str, torch.Tensor]]
LOSS_TERMS = ("labels", "boxes", "masks")


@dataclass
class QuerySet:
    """One entry of the criterion's list (see the module doc)."""

    outputs: Mapping  # pred_logits / pred_boxes / pred_masks ... and optionally aux_outputs
    suffix: str = ""  # loss-key suffix
    targets: Optional[Targets] = None  # None: the ground truth given to the criterion
    indices: Optional[Indices] = None  # fixed assignment for every layer; None: Hungarian per layer
    weight: float = 1.0  # multiplies every loss of the entry
    normalizer: float = 1.0  # the entry's num_boxes = (GT objects across workers) * normalizer


def repeat_targets(targets: Targets, k: int) -> List[Dict[str, torch.Tensor]]:
    """H-DETR one-to-many targets: every per-object field of each image repeated k
    times (``[T, ...] -> [k*T, ...]``, the k copies one after another)."""
    return [{key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in t.items()} for t in targets]


def class_agnostic_targets(targets: Targets) -> List[Dict[str, torch.Tensor]]:
    """Targets with every label set to 0 (Deformable-DETR's binary encoder proposals)."""
    return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]


def num_boxes_across_ranks(targets: Targets, device) -> float:
    """Average number of target objects per worker, at least 1 (DETR's normaliser)."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(n)
    return max(n.item() / comm.get_world_size(), 1.0)


def _first_tensor(outputs: Mapping) -> torch.Tensor:
    return next(v for v in outputs.values() if torch.is_tensor(v))


class SetCriterion(nn.Module):
    """Losses of a set-prediction model over a list of :class:`QuerySet` entries.

    Args:
        matcher: Hungarian matcher for entries without fixed indices.
        loss_weights: weight per loss key, e.g. ``{"loss_class": 1, "loss_bbox": 5, "loss_giou": 2}``;
            a key missing here has weight 0 (not returned).
        losses: the terms computed for every entry: any of "labels", "boxes", "masks" and
            the names of ``extra_loss_fns``.
        class_loss: "focal" (sigmoid, K logits), "quality_focal" (sigmoid, K logits, the
            matched class's target = the IoU of its box, exponent ``qfl_beta``; official Co-DINO)
            or "softmax" (K+1 logits, no-object weighted by ``eos_coef``).
        num_points / oversample_ratio / importance_sample_ratio: the point-sampled mask
            terms (Mask2Former: 12544, 3, 0.75).
        extra_loss_fns: more terms by name (e.g. Mask Frozen-DETR's mask IoU).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        loss_weights: Mapping[str, float],
        losses: Sequence[str] = ("labels", "boxes"),
        class_loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        extra_loss_fns: Optional[Mapping[str, LossFn]] = None,
        qfl_beta: float = 2.0,
    ):
        super().__init__()
        if class_loss not in ("focal", "quality_focal", "softmax"):
            raise ValueError(f"SetCriterion: class_loss must be 'focal', 'quality_focal' or 'softmax', got "
                             f"{class_loss!r}")
        table: Dict[str, LossFn] = {"labels": self._class_term, "boxes": self._box_term, "masks": self._mask_term}
        table.update(extra_loss_fns or {})
        unknown = [name for name in losses if name not in table]
        if unknown or not losses:
            raise ValueError(f"SetCriterion: unknown loss terms {unknown} (or none given); known: {sorted(table)}")
        self.matcher = matcher
        self.loss_weights = dict(loss_weights)
        self.loss_fns = {name: table[name] for name in losses}
        self.class_loss, self.focal_alpha, self.focal_gamma, self.eos_coef = class_loss, focal_alpha, focal_gamma, eos_coef
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.qfl_beta = qfl_beta
        self.importance_sample_ratio = importance_sample_ratio

    # ------------------------------------------------------------------ terms
    def _class_term(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        if self.class_loss == "focal":
            loss = class_loss_focal(logits, targets, indices, num_boxes, self.focal_alpha, self.focal_gamma)
        elif self.class_loss == "quality_focal":
            loss = class_loss_quality_focal(logits, outputs["pred_boxes"], targets, indices, num_boxes, self.qfl_beta)
        else:
            loss = class_loss_softmax(logits, targets, indices, num_boxes, self.eos_coef)
        return {"loss_class": loss}

    def _box_term(self, outputs, targets, indices, num_boxes):
        return box_losses(outputs["pred_boxes"], targets, indices, num_boxes)

    def _mask_term(self, outputs, targets, indices, num_boxes):
        """Point-sampled BCE + dice of the matched masks (importance sampling on the
        predictions; targets read at the same points, mapped through the box when the
        masks are predicted inside boxes)."""
        batch_idx, query_idx = matched_query_index(indices)
        pred = outputs["pred_masks"][batch_idx, query_idx][:, None]
        gt = matched_targets(targets, indices, "masks").to(pred.device, pred.dtype)[:, None]
        if "pred_mask_boxes" in outputs:
            boxes, size = outputs["pred_mask_boxes"][batch_idx, query_idx], tuple(gt.shape[-2:])
            sample = lambda c: point_sample(gt, box_points_to_image(c, boxes, size))[:, 0]  # noqa: E731
        else:
            sample = lambda c: point_sample(gt, c)[:, 0]  # noqa: E731
        return point_mask_losses(pred, sample, num_boxes, self.num_points, self.oversample_ratio,
                                 self.importance_sample_ratio)

    # ------------------------------------------------------------------ entries
    def layer_losses(self, outputs, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """Unweighted loss terms of one layer of a query set for a given matching."""
        losses: Dict[str, torch.Tensor] = {}
        for fn in self.loss_fns.values():
            losses.update(fn(outputs, targets, indices, num_boxes))
        return losses

    def query_set_losses(self, entry: QuerySet, targets: Targets, num_boxes: float) -> Dict[str, torch.Tensor]:
        """Weighted losses of an entry and of its ``aux_outputs`` (``{suffix}_aux{i}``)."""
        targets = targets if entry.targets is None else entry.targets
        num_boxes = num_boxes * entry.normalizer
        outputs = entry.outputs
        layers = [("", outputs)] + [(f"_aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        weighted: Dict[str, torch.Tensor] = {}
        for layer_suffix, layer_outputs in layers:
            indices = entry.indices if entry.indices is not None else self.matcher(layer_outputs, targets)
            for name, value in self.layer_losses(layer_outputs, targets, indices, num_boxes).items():
                weight = self.loss_weights.get(name, 0.0) * entry.weight
                if weight != 0:
                    weighted[name + entry.suffix + layer_suffix] = value * weight
        return weighted

    def forward(self, query_sets: Sequence[QuerySet], targets: Targets) -> Dict[str, torch.Tensor]:
        """Args:
            query_sets: the entries to supervise (suffixes must differ).
            targets: the ground truth per image (see the module doc); moved to the
                predictions' device.
        """
        suffixes = [entry.suffix for entry in query_sets]
        if len(set(suffixes)) != len(suffixes):
            raise ValueError(f"SetCriterion: query sets need distinct suffixes, got {suffixes}")
        device = _first_tensor(query_sets[0].outputs).device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        num_boxes = num_boxes_across_ranks(targets, device)
        losses: Dict[str, torch.Tensor] = {}
        for entry in query_sets:
            if entry.targets is not None:
                entry = QuerySet(**{**vars(entry), "targets": [{k: v.to(device) for k, v in t.items()}
                                                             for t in entry.targets]})
            losses.update(self.query_set_losses(entry, targets, num_boxes))
        return losses
