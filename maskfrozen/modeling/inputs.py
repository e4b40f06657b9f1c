"""The input batch every meta-architecture of ours builds from detectron2's dicts."""
from typing import Dict, List

import torch
from detectron2.structures import ImageList

__all__ = ["normalized_image_batch", "padding_mask"]


def normalized_image_batch(batched_inputs: List[Dict], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                           size_divisibility: int) -> ImageList:
    """``(image - mean) / std`` of each input (CHW, on the device of ``pixel_mean``), padded
    into one ``ImageList`` whose size is a multiple of ``size_divisibility``."""
    device = pixel_mean.device
    images = [(x["image"].to(device) - pixel_mean) / pixel_std for x in batched_inputs]
    return ImageList.from_tensors(images, size_divisibility)


def padding_mask(image_sizes, size, stride: int = 1, device=None) -> torch.Tensor:
    """``[N, H, W]`` bool, True outside ``ceil(image size / stride)`` of each image: the padding
    of a batch (``stride`` 1) or of a level of stride ``stride``. ``image_sizes``: the (h, w)
    pairs of ``ImageList.image_sizes``, or an ``[N, 2]`` integer tensor (an exported graph's
    input); built without a Python loop over the images, so that ``torch.export`` keeps the
    image sizes as graph values."""
    sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=device).view(-1, 2)
    valid = -(-sizes // stride)  # ceil for positive sizes
    rows = torch.arange(size[0], device=sizes.device)[None, :, None] >= valid[:, 0, None, None]
    cols = torch.arange(size[1], device=sizes.device)[None, None, :] >= valid[:, 1, None, None]
    return rows | cols
