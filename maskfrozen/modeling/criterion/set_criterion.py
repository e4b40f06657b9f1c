"""Set criterion: one per-set loss, applied to every query set a DETR produces.

A *query set* is a dict with ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]`` and
optionally ``aux_outputs`` (the same for earlier decoder layers). The criterion
computes the same loss terms for each set, only the targets and the matching differ:

==================  =========================  =============================  ==============
set                 targets                    matching                       key suffix
==================  =========================  =============================  ==============
main (last layer)   GT                         Hungarian                      ``""``
aux layer i         GT                         Hungarian                      ``_aux{i}``
encoder proposals   GT (labels 0 if agnostic)  Hungarian                      ``_enc``
denoising           GT                         fixed (``dn_outputs.indices``) ``_dn``
one-to-many         GT repeated k times        Hungarian                      ``_one2many``
==================  =========================  =============================  ==============

Returned losses are already multiplied by their weights (``loss_weights`` per term,
``one2many_weight`` on top for the one-to-many set), so the total is their sum.
"""
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.utils import comm
from torch import nn

from .losses import Indices, box_losses, class_loss_focal, class_loss_softmax
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "repeat_targets", "LossFn"]

Targets = Sequence[Dict[str, torch.Tensor]]
# (query set, targets, indices, num_boxes) -> {"loss_<name>": tensor}
LossFn = Callable[[Mapping[str, torch.Tensor], Targets, Indices, float], Dict[str, torch.Tensor]]


def repeat_targets(targets: Targets, k: int) -> List[Dict[str, torch.Tensor]]:
    """H-DETR one-to-many targets: every per-object field of each image repeated k
    times (``[T, ...] -> [k*T, ...]``, the k copies one after another)."""
    return [{key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in t.items()} for t in targets]


def _class_agnostic(targets: Targets) -> List[Dict[str, torch.Tensor]]:
    """Targets with every label set to 0 (Deformable-DETR's binary encoder proposals)."""
    return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]


def num_boxes_across_ranks(targets: Targets, device) -> float:
    """Average number of target boxes per worker, at least 1 (DETR's normaliser)."""
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(n)
    return max(n.item() / comm.get_world_size(), 1.0)


class SetCriterion(nn.Module):
    """Losses of a set-prediction detector over all its query sets (see module doc).

    Args:
        matcher: assigns queries to targets (Hungarian).
        loss_weights: weight per loss key, e.g. ``{"loss_class": 1, "loss_bbox": 5, "loss_giou": 2}``;
            a key missing here has weight 0 (computed, but not returned).
        class_loss: "focal" (sigmoid, K logits) or "softmax" (K+1 logits, last = no object).
        enc_class_agnostic: encoder proposals are scored object-vs-background (labels 0).
        one2many_repeats / one2many_weight: H-DETR's k and lambda.
        extra_loss_fns: more per-set terms by name (e.g. point-sampled mask losses), run
            on every set after the class and box terms.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        loss_weights: Mapping[str, float],
        class_loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eos_coef: float = 0.1,
        enc_class_agnostic: bool = False,
        one2many_repeats: int = 6,
        one2many_weight: float = 1.0,
        extra_loss_fns: Optional[Mapping[str, LossFn]] = None,
    ):
        super().__init__()
        if class_loss not in ("focal", "softmax"):
            raise ValueError(f"SetCriterion: class_loss must be 'focal' or 'softmax', got {class_loss!r}")
        self.matcher = matcher
        self.loss_weights = dict(loss_weights)
        self.class_loss = class_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eos_coef = eos_coef
        self.enc_class_agnostic = enc_class_agnostic
        self.one2many_repeats = one2many_repeats
        self.one2many_weight = one2many_weight
        self.loss_fns: Dict[str, LossFn] = {"class": self._class_term, "boxes": self._box_term}
        self.loss_fns.update(extra_loss_fns or {})

    # ------------------------------------------------------------------ terms
    def _class_term(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        if self.class_loss == "focal":
            loss = class_loss_focal(logits, targets, indices, num_boxes, self.focal_alpha, self.focal_gamma)
        else:
            loss = class_loss_softmax(logits, targets, indices, num_boxes, self.eos_coef)
        return {"loss_class": loss}

    def _box_term(self, outputs, targets, indices, num_boxes):
        return box_losses(outputs["pred_boxes"], targets, indices, num_boxes)

    # ------------------------------------------------------------------ sets
    def set_losses(self, outputs, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, torch.Tensor]:
        """Unweighted loss terms of one query set for a given matching."""
        losses: Dict[str, torch.Tensor] = {}
        for fn in self.loss_fns.values():
            losses.update(fn(outputs, targets, indices, num_boxes))
        return losses

    def deep_supervision_losses(
        self,
        outputs: Mapping,
        targets: Targets,
        num_boxes: float,
        suffix: str,
        indices: Optional[Indices] = None,
        scale: float = 1.0,
    ) -> Dict[str, torch.Tensor]:
        """Weighted losses of a set and of its ``aux_outputs`` (``{suffix}_aux{i}``).
        With ``indices`` given, every layer uses that fixed matching (denoising)."""
        layers = [("", outputs)] + [(f"_aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        weighted: Dict[str, torch.Tensor] = {}
        for layer_suffix, layer_outputs in layers:
            layer_indices = indices if indices is not None else self.matcher(layer_outputs, targets)
            for name, value in self.set_losses(layer_outputs, targets, layer_indices, num_boxes).items():
                weight = self.loss_weights.get(name, 0.0) * scale
                if weight != 0:
                    weighted[name + suffix + layer_suffix] = value * weight
        return weighted

    def forward(self, outputs: Mapping, targets: Targets) -> Dict[str, torch.Tensor]:
        """Args:
            outputs: the main query set, optionally with ``enc_outputs`` (a set),
                ``dn_outputs`` (a set with ``indices`` and ``num_groups``) and
                ``one2many_outputs`` (a set).
            targets: per image ``labels [T]`` int64 and ``boxes [T, 4]`` normalised (cx, cy, w, h).
        """
        device = outputs["pred_logits"].device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        num_boxes = num_boxes_across_ranks(targets, device)
        losses = self.deep_supervision_losses(outputs, targets, num_boxes, "")
        if "enc_outputs" in outputs:
            enc_targets = _class_agnostic(targets) if self.enc_class_agnostic else targets
            losses.update(self.deep_supervision_losses(outputs["enc_outputs"], enc_targets, num_boxes, "_enc"))
        if "dn_outputs" in outputs:
            dn = outputs["dn_outputs"]
            losses.update(
                self.deep_supervision_losses(dn, targets, num_boxes * dn["num_groups"], "_dn", indices=dn["indices"])
            )
        if "one2many_outputs" in outputs:
            k = self.one2many_repeats
            losses.update(
                self.deep_supervision_losses(
                    outputs["one2many_outputs"], repeat_targets(targets, k), num_boxes * k, "_one2many",
                    scale=self.one2many_weight,
                )
            )
        return losses
