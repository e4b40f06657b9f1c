"""Ground-truth masks as every mask model's criterion reads them: per image ``[T, H, W]``
bool over the padded batch image (polygons rasterised, zero padding right and bottom)."""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, PolygonMasks

__all__ = ["padded_gt_masks"]


def padded_gt_masks(batched_input: Dict, padded_size: Tuple[int, int], device: torch.device,
                    model_name: str) -> torch.Tensor:
    """``[T, H_pad, W_pad]`` bool GT masks of one detectron2 input dict.

    Raises a KeyError naming the file and the real cause when the instances carry no
    masks (annotations without "segmentation", or a mapper that dropped them)."""
    inst = batched_input.get("instances")
    if inst is None or not inst.has("gt_masks"):
        raise KeyError(f"{model_name} training needs GT masks, but the instances of "
                       f"{batched_input.get('file_name', 'an input image')!r} have none: the dataset's annotations "
                       "carry no 'segmentation' (a boxes-only json?) or the mapper dropped them "
                       "(MODEL.MASK_ON must be True)")
    masks = inst.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, *inst.image_size)
    masks = masks.tensor.to(device, torch.bool)
    padded_h, padded_w = padded_size
    return F.pad(masks, (0, padded_w - masks.shape[-1], 0, padded_h - masks.shape[-2]))
