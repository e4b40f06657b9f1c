"""Compare an exported model with the PyTorch model: raw outputs (max abs difference per
output) and final ``Instances`` (same classes in the same ranking, boxes within a tolerance in
pixels, mask IoU above a threshold). Used by tools/export_model.py ``--verify``, the tests and
the benchmark."""
from typing import Dict, List, Mapping

import torch
from detectron2.structures import Instances

__all__ = ["max_abs_differences", "differences_by_kind", "compare_instances", "instances_match"]


def max_abs_differences(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Max abs difference of each output of ``reference`` (shapes must agree; integer outputs
    are compared as numbers)."""
    diffs = {}
    for name, ref in reference.items():
        got = other[name]
        if tuple(ref.shape) != tuple(got.shape):
            raise ValueError(f"output {name!r}: shape {tuple(got.shape)} differs from the PyTorch {tuple(ref.shape)}")
        diffs[name] = float((ref.double() - got.double()).abs().max()) if ref.numel() else 0.0
    return diffs


def differences_by_kind(diffs: Mapping[str, float], kinds: Mapping[str, str]) -> Dict[str, float]:
    """The largest difference per kind ("logits", "boxes", "masks", "other") of named outputs."""
    out: Dict[str, float] = {}
    for name, value in diffs.items():
        kind = kinds.get(name, "other")
        out[kind] = max(out.get(kind, 0.0), value)
    return out


def _mask_ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def compare_instances(reference: Instances, other: Instances) -> Dict:
    """``count`` (reference, other), ``classes_equal`` (same classes in the same order),
    ``max_box_diff`` (px), ``max_score_diff``, ``min_mask_iou`` (1.0 without masks)."""
    result = {"count": (len(reference), len(other)), "classes_equal": False, "max_box_diff": float("inf"),
              "max_score_diff": float("inf"), "min_mask_iou": 0.0}
    if len(reference) != len(other):
        return result
    result["classes_equal"] = bool(torch.equal(reference.pred_classes, other.pred_classes))
    result["max_score_diff"] = float((reference.scores - other.scores).abs().max()) if len(reference) else 0.0
    if reference.has("pred_boxes"):
        a, b = reference.pred_boxes.tensor, other.pred_boxes.tensor
        result["max_box_diff"] = float((a - b).abs().max()) if len(reference) else 0.0
    else:
        result["max_box_diff"] = 0.0
    if reference.has("pred_masks") and len(reference):
        result["min_mask_iou"] = float(_mask_ious(reference.pred_masks, other.pred_masks).min())
    else:
        result["min_mask_iou"] = 1.0
    return result


def instances_match(reference: Instances, other: Instances, box_tolerance: float = 0.5,
                    min_mask_iou: float = 0.99) -> bool:
    """Same classes in the same ranking, boxes within ``box_tolerance`` px, masks IoU >= ``min_mask_iou``."""
    c = compare_instances(reference, other)
    return (c["count"][0] == c["count"][1] and c["classes_equal"] and c["max_box_diff"] <= box_tolerance
            and c["min_mask_iou"] >= min_mask_iou)


def summarize(comparisons: List[Dict]) -> Dict:
    """Worst case over several :func:`compare_instances` results."""
    return {
        "counts": [c["count"] for c in comparisons],
        "classes_equal": all(c["classes_equal"] for c in comparisons),
        "max_box_diff": max((c["max_box_diff"] for c in comparisons), default=0.0),
        "max_score_diff": max((c["max_score_diff"] for c in comparisons), default=0.0),
        "min_mask_iou": min((c["min_mask_iou"] for c in comparisons), default=1.0),
    }
