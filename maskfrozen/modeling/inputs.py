"""The input batch every meta-architecture of ours builds from detectron2's dicts."""
from typing import Dict, List

import torch
from detectron2.structures import ImageList

__all__ = ["normalized_image_batch"]


def normalized_image_batch(batched_inputs: List[Dict], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                           size_divisibility: int) -> ImageList:
    """``(image - mean) / std`` of each input (CHW, on the device of ``pixel_mean``), padded
    into one ``ImageList`` whose size is a multiple of ``size_divisibility``."""
    device = pixel_mean.device
    images = [(x["image"].to(device) - pixel_mean) / pixel_std for x in batched_inputs]
    return ImageList.from_tensors(images, size_divisibility)
