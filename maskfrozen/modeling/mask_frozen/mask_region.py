"""Where Mask Frozen-DETR predicts a query's mask: inside its box (the paper's final
design) or over the whole image (the baseline). Everything that depends on that choice
lives in one object, registered in ``MASK_REGION_REGISTRY`` (``MODEL.MASK_FROZEN.MASK_REGION``):

- ``embed_dim``: the width of the mask embeddings ``e_i``;
- ``logits``: the mask logits from the mask embeddings ``e_i`` and the features;
- ``roi_probs``: the mask probabilities on each box's RoI grid (the scoring head's input);
- ``criterion_outputs``: the masks as the shared criterion reads them;
- ``binary_masks``: thresholded masks over the padded input image (mask-IoU targets);
- ``attach``: the masks of a detection set at inference (pasted at the output size).
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.structures import Instances

from maskfrozen.modeling.registries import MASK_REGION_REGISTRY, build_from_registry

from .roi_ops import paste_roi_masks, roi_align_per_mask

__all__ = ["BoxMaskRegion", "ImageMaskRegion", "build_mask_region"]


class _MaskRegion:
    """Geometry shared by both regions: RoI grid size, stride of the mask features."""

    @configurable
    def __init__(self, *, roi_size: int, c1_stride: int, roi_sampling_ratio: int = 2):
        self.roi_size, self.c1_stride, self.roi_sampling_ratio = roi_size, c1_stride, roi_sampling_ratio

    @classmethod
    def from_config(cls, cfg: CfgNode, c1_stride: int):
        m = cfg.MODEL.MASK_FROZEN
        return {"roi_size": m.ROI_SIZE, "c1_stride": c1_stride, "roi_sampling_ratio": m.ROI_SAMPLING_RATIO}


@MASK_REGION_REGISTRY.register()
class BoxMaskRegion(_MaskRegion):
    """``M_i = sigmoid(e_i . R_i)`` on the ``S x S`` RoI grid of box ``b_i``, pasted into it."""

    config_name = "box"

    def embed_dim(self, roi_dim: int, feature_dim: int) -> int:
        """Channels of e_i: it is dotted with the RoI features."""
        return roi_dim

    def logits(self, embed: torch.Tensor, rois: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``embed [B, N, d_b]``, ``rois [B*N, d_b, S, S]`` -> ``[B*N, 1, S, S]``."""
        return torch.einsum("mc,mchw->mhw", embed.flatten(0, 1), rois)[:, None]

    def roi_probs(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return logits.detach().sigmoid()

    def criterion_outputs(self, logits: torch.Tensor, boxes: torch.Tensor, batch: int) -> Dict[str, torch.Tensor]:
        return {"pred_masks": logits[:, 0].unflatten(0, (batch, -1)),
                "pred_mask_boxes": boxes.unflatten(0, (batch, -1))}

    def binary_masks(self, logits: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                     threshold: float) -> torch.Tensor:
        return paste_roi_masks(logits[:, 0].sigmoid(), boxes, image_size, threshold)

    def attach(self, inst: Instances, logits: torch.Tensor) -> None:
        inst.pred_masks = logits.sigmoid()  # [n, 1, S, S], pasted into the boxes at the output size


@MASK_REGION_REGISTRY.register()
class ImageMaskRegion(_MaskRegion):
    """``M_i = sigmoid(e_i . F)`` over the padded image at the resolution of C1."""

    config_name = "image"

    def embed_dim(self, roi_dim: int, feature_dim: int) -> int:
        """Channels of e_i: it is dotted with the image features F."""
        return feature_dim

    def logits(self, embed: torch.Tensor, rois: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``embed [B, N, d]``, ``features [B, d, H/s, W/s]`` -> ``[B*N, 1, H/s, W/s]``."""
        return torch.einsum("bnc,bchw->bnhw", embed, features).flatten(0, 1)[:, None]

    def roi_probs(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return roi_align_per_mask(logits.detach().sigmoid()[:, 0], boxes, self.roi_size, 1.0 / self.c1_stride,
                                  self.roi_sampling_ratio)

    def criterion_outputs(self, logits: torch.Tensor, boxes: torch.Tensor, batch: int) -> Dict[str, torch.Tensor]:
        return {"pred_masks": logits[:, 0].unflatten(0, (batch, -1))}

    def binary_masks(self, logits: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                     threshold: float) -> torch.Tensor:
        probs = F.interpolate(logits.sigmoid(), size=image_size, mode="bilinear", align_corners=False)
        return probs[:, 0] > threshold

    def attach(self, inst: Instances, logits: torch.Tensor) -> None:
        h, w = inst.image_size
        full = F.interpolate(logits, scale_factor=self.c1_stride, mode="bilinear", align_corners=False)
        inst.pred_mask_probs = full[:, 0, :h, :w].sigmoid()


def build_mask_region(cfg: CfgNode, c1_stride: int):
    """The region named by ``MODEL.MASK_FROZEN.MASK_REGION``."""
    return build_from_registry(MASK_REGION_REGISTRY, cfg.MODEL.MASK_FROZEN.MASK_REGION,
                               "MODEL.MASK_FROZEN.MASK_REGION", cfg, c1_stride)
