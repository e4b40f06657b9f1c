"""Box helpers shared by every model.

Conversions and IoUs come from ``torchvision.ops`` (one implementation of each in the
stack); this module adds the DETR-specific pieces: ``inverse_sigmoid`` for box
refinement in logit space and the normalised <-> absolute conversions.
"""
import torch
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "inverse_sigmoid",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) = log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps,
    so boxes on the image border stay finite (the Deformable-DETR convention)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))
