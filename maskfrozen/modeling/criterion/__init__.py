"""Matching and losses shared by every query-based model (DETRs, mask models)."""
from .losses import (  # noqa: F401
    box_l1_cost,
    box_losses,
    class_cost_focal,
    class_cost_softmax,
    class_loss_focal,
    class_loss_softmax,
    giou_cost,
    location_cost,
    matched_query_index,
    matched_targets,
)
from .matcher import HungarianMatcher, default_cost_fns, point_mask_costs  # noqa: F401
from .set_criterion import (  # noqa: F401
    QuerySet,
    SetCriterion,
    class_agnostic_targets,
    num_boxes_across_ranks,
    repeat_targets,
)
