"""Hungarian matcher with a pluggable table of weighted pairwise costs.

Costs by name: "class" (focal or softmax), "bbox" (L1), "giou", and the point-sampled
mask costs "mask" (sigmoid BCE) and "dice" (Mask2Former): the predicted and target masks
of an image are read at the same ``num_mask_points`` uniform points, shared by all its
queries and targets; and FastInst's "location" (is the query's pixel inside the GT mask).
More costs plug in by name through ``cost_fns``.
"""
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .losses import Indices, box_l1_cost, class_cost_focal, class_cost_softmax, giou_cost, location_cost
from .mask_losses import dice_cost, sigmoid_bce_cost
from .point_sampling import point_sample, uniform_points

__all__ = ["HungarianMatcher", "CostFn", "default_cost_fns", "point_mask_costs", "MASK_COSTS"]

# (outputs of one image: {"pred_logits": [Q, K], "pred_boxes": [Q, 4], ...},
#  target of that image: {"labels": [T], "boxes": [T, 4], ...}) -> cost [Q, T]
CostFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
MASK_COSTS = ("mask", "dice")


def point_mask_costs(pred_masks: torch.Tensor, tgt_masks: torch.Tensor, coords: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``[Q, h, w]`` mask logits and ``[T, H, W]`` target masks, both read at the same
    ``[P, 2]`` normalised (x, y) points -> ``{"mask": [Q, T] BCE, "dice": [Q, T] dice}``."""
    pred = point_sample(pred_masks[:, None], coords[None].expand(len(pred_masks), -1, -1))[:, 0]
    tgt = point_sample(tgt_masks[:, None].to(pred.dtype), coords[None].expand(len(tgt_masks), -1, -1))[:, 0]
    return {"mask": sigmoid_bce_cost(pred, tgt), "dice": dice_cost(pred, tgt)}


def default_cost_fns(class_cost: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Dict[str, CostFn]:
    """The costs by name: "class" (focal or softmax), "bbox" (L1), "giou", the point-sampled
    "mask" / "dice", and FastInst's "location" (``query_locations`` inside the GT mask)."""
    if class_cost == "focal":
        cls = partial(class_cost_focal, alpha=focal_alpha, gamma=focal_gamma)
    elif class_cost == "softmax":
        cls = class_cost_softmax
    else:
        raise ValueError(f"HungarianMatcher: class_cost must be 'focal' or 'softmax', got {class_cost!r}")
    return {
        "class": lambda out, tgt: cls(out["pred_logits"], tgt["labels"]),
        "bbox": lambda out, tgt: box_l1_cost(out["pred_boxes"], tgt["boxes"]),
        "giou": lambda out, tgt: giou_cost(out["pred_boxes"], tgt["boxes"]),
        "mask": lambda out, tgt: out["mask_costs"]["mask"],
        "dice": lambda out, tgt: out["mask_costs"]["dice"],
        "location": lambda out, tgt: location_cost(out["query_locations"], tgt["masks"]),
    }


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising sum_k w_k * C_k.

    ``cost_weights`` names the costs to use and their weights (DINO: class 2, bbox 5,
    giou 2); ``cost_fns`` maps names to :data:`CostFn` and can be extended, e.g. with
    point-sampled mask BCE/dice costs, without touching this class. Costs are computed
    per image in float32 with autocast disabled; scipy's ``linear_sum_assignment``
    solves each image.
    """

    def __init__(
        self,
        cost_weights: Mapping[str, float],
        class_cost: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cost_fns: Optional[Mapping[str, CostFn]] = None,
        num_mask_points: int = 12544,
    ):
        super().__init__()
        fns = default_cost_fns(class_cost, focal_alpha, focal_gamma)
        fns.update(cost_fns or {})
        unknown = sorted(set(cost_weights) - set(fns))
        if unknown:
            raise ValueError(f"HungarianMatcher: no cost function for {unknown}; known: {sorted(fns)}")
        if all(w == 0 for w in cost_weights.values()):
            raise ValueError("HungarianMatcher: all cost weights are 0")
        self.cost_weights = {k: float(w) for k, w in cost_weights.items() if w != 0}
        self.cost_fns = fns
        self.num_mask_points = num_mask_points
        self.uses_mask_costs = any(name in self.cost_weights for name in MASK_COSTS)

    def mask_points(self, device: torch.device) -> torch.Tensor:
        """``[P, 2]`` uniform random (x, y) points shared by an image's masks."""
        return uniform_points(1, self.num_mask_points, device)[0]

    def cost_matrix(self, outputs: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[Q, T]`` weighted total cost for one image (float32)."""
        outputs = {k: v.float() for k, v in outputs.items()}
        target = {k: (v.float() if v.is_floating_point() else v) for k, v in target.items()}
        if self.uses_mask_costs:
            if "pred_mask_boxes" in outputs:
                raise ValueError("HungarianMatcher: the point-sampled mask costs need masks over the image; these "
                                 "are predicted inside boxes (pred_mask_boxes): match them with box costs")
            points = self.mask_points(outputs["pred_masks"].device)
            outputs["mask_costs"] = point_mask_costs(outputs["pred_masks"], target["masks"], points)
        total = 0
        for name, weight in self.cost_weights.items():
            total = total + weight * self.cost_fns[name](outputs, target)
        return total

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]]) -> Indices:
        """Args:
            outputs: batched predictions, e.g. ``pred_logits [B, Q, K]``, ``pred_boxes [B, Q, 4]``
                (only tensors with a batch dim of B are used).
            targets: B dicts with ``labels [T_i]``, ``boxes [T_i, 4]`` (cx, cy, w, h normalised)
                and, for the mask costs, ``masks [T_i, H, W]`` over the padded image.
        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors, sorted by query.
        """
        batch = len(targets)
        per_image = {k: v for k, v in outputs.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == batch}
        device_type = next(iter(per_image.values())).device.type
        indices: List = []
        with torch.autocast(device_type=device_type, enabled=False):
            for i, target in enumerate(targets):
                num_queries = next(iter(per_image.values())).shape[1]
                if len(target["labels"]) == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                cost = self.cost_matrix({k: v[i] for k, v in per_image.items()}, target)
                if cost.shape[0] != num_queries or not torch.isfinite(cost).all():
                    raise FloatingPointError(
                        f"HungarianMatcher: image {i} cost matrix {tuple(cost.shape)} has "
                        f"{(~torch.isfinite(cost)).sum().item()} non-finite entries (NaN/inf predictions?)"
                    )
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return f"cost_weights={self.cost_weights}"
