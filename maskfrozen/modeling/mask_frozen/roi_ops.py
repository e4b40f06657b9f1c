"""Box-region helpers of Mask Frozen-DETR: RoIAlign per query, pasting and mask IoU
(the map from a box's RoI frame to the image is the shared
``criterion.point_sampling.box_points_to_image``).

Coordinate convention (detectron2's): pixel ``(i, j)`` covers ``[j, j+1] x [i, i+1]``
in continuous image coordinates; RoIAlign uses ``aligned=True`` and pasting samples
pixel centres with ``grid_sample(align_corners=False)``, so a mask predicted on the
``S x S`` RoI grid of box ``b`` is pasted back exactly where it was pooled from.
"""
from typing import Tuple

import torch
from detectron2.layers import paste_masks_in_image
from torchvision.ops import roi_align

__all__ = ["roi_align_per_query", "roi_align_per_mask", "paste_roi_masks", "mask_iou"]


def roi_align_per_query(features: torch.Tensor, boxes: torch.Tensor, output_size: int, spatial_scale: float,
                        sampling_ratio: int = 2) -> torch.Tensor:
    """RoI features R_i of every query: ``features [B, C, H, W]``, ``boxes [B, N, 4]``
    XYXY in input pixels -> ``[B * N, C, S, S]`` (image-major). ``sampling_ratio``:
    bilinear samples per bin side (0: adaptive, as many as the box covers)."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"roi_align_per_query: boxes must be [B={features.shape[0]}, N, 4], got {tuple(boxes.shape)}")
    # (image index, x0, y0, x1, y1) rows, as torchvision builds them from a list of per-image boxes;
    # no Python list over the images, so that torch.export keeps the batch size dynamic
    b, n = boxes.shape[:2]
    index = torch.arange(b, device=boxes.device, dtype=features.dtype)[:, None, None].expand(b, n, 1)
    rois = torch.cat([index, boxes.to(features.dtype)], 2).flatten(0, 1)
    return roi_align(features, rois, (output_size, output_size), spatial_scale, sampling_ratio=sampling_ratio,
                     aligned=True)


def roi_align_per_mask(maps: torch.Tensor, boxes: torch.Tensor, output_size: int, spatial_scale: float,
                       sampling_ratio: int = 2) -> torch.Tensor:
    """Pool one map per box: ``maps [M, H, W]``, ``boxes [M, 4]`` -> ``[M, 1, S, S]``."""
    index = torch.arange(len(boxes), device=boxes.device, dtype=maps.dtype)[:, None]
    rois = torch.cat([index, boxes.to(maps.dtype)], 1)
    return roi_align(maps[:, None], rois, (output_size, output_size), spatial_scale, sampling_ratio=sampling_ratio,
                     aligned=True)


def paste_roi_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """``[M, S, S]`` RoI probabilities pasted into their ``[M, 4]`` boxes of an ``(H, W)``
    image -> ``[M, H, W]`` bool (detectron2's ``paste_masks_in_image``)."""
    return paste_masks_in_image(mask_probs, boxes, tuple(int(s) for s in image_size), threshold)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of paired binary masks ``[M, H, W]`` -> ``[M]`` (0 when both are empty)."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return inter / union.clamp(min=1.0)
