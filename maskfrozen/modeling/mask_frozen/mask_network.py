"""The light, trainable mask network of Mask Frozen-DETR.

From the frozen detector it takes C1 (backbone stage-1 features, stride 4), the encoder
output E and the top-N object queries q_i with their boxes b_i, and predicts:

    F   = Neck(C1) + interpolate(F_e(E)_1)                      (image feature encoder)
    R_i = F_b(RoIAlign(Mapper(F), b_i))                          (box feature encoder)
    q_i = QueryEncoder(q_i, R_i)                                 (box-to-object attention)
    e_i = MLP(q_i)
    box region:  M_i = sigmoid(e_i . R_i)         on the S x S grid of b_i (pasted later)
    image:       M_i = sigmoid(e_i . F)           over the whole image at 1/4
    iou_i = MaskIoUHead(Cat(M_i, R_i))                           (optional mask scoring)
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers.transformer_blocks import MLP
from maskfrozen.modeling.detr.transformer import DeformableTransformerOutput

from .roi_ops import roi_align_per_mask, roi_align_per_query

__all__ = ["MASK_REGIONS", "NECKS", "MaskPredictions", "C1Neck", "MaskNetwork"]

MASK_REGIONS = ("box", "image")
NECKS = ("conv_gn", "linear")


@dataclass
class MaskPredictions:
    """Mask network outputs for the B*N selected queries (image-major)."""

    region: str  # "box": logits on each box's S x S grid; "image": over the padded image at 1/stride
    logits: torch.Tensor  # [B*N, 1, h, w]
    boxes: torch.Tensor  # [B*N, 4] XYXY in input pixels
    roi_mask_probs: torch.Tensor  # [B*N, 1, S, S] mask probabilities inside each box (detached)
    iou: Optional[torch.Tensor] = None  # [B*N] predicted mask IoU, when mask scoring is on


class C1Neck(nn.Module):
    """C1 -> d channels: pointwise conv (+ GroupNorm for ``conv_gn``, the paper's neck)."""

    def __init__(self, kind: str, in_channels: int, dim: int, gn_groups: int = 32):
        super().__init__()
        if kind not in NECKS:
            raise ValueError(f"MODEL.MASK_FROZEN.NECK={kind!r}; expected one of {NECKS}")
        self.conv = nn.Conv2d(in_channels, dim, 1)
        self.norm = nn.GroupNorm(gn_groups, dim) if kind == "conv_gn" else nn.Identity()

    def forward(self, c1: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(c1))


class MaskNetwork(nn.Module):
    """See the module doc. Sub-modules are built by the caller (meta-arch ``from_config``).

    Args:
        region: "box" (RoI masks, the paper's final design) or "image" (baseline masks).
        neck: C1 -> d. image_encoder: F_e, detector output -> refined E1 ``[B, d, ., .]``.
        box_encoder: F_b with ``out_channels`` d_b. query_encoder: queries x RoIs -> queries.
        mask_embed: MLP q_i -> e_i (d_b channels for "box", d for "image").
        scoring_head: :class:`MaskIoUHead` or None.
        roi_size: S. c1_stride: stride of C1 in input pixels. roi_sampling_ratio: RoIAlign
        samples per bin side (0: adaptive).
    """

    def __init__(self, *, region: str, neck: nn.Module, image_encoder: nn.Module, box_encoder: nn.Module,
                 query_encoder: nn.Module, mask_embed: nn.Module, scoring_head: Optional[nn.Module], roi_size: int,
                 c1_stride: int, roi_sampling_ratio: int = 2):
        super().__init__()
        if region not in MASK_REGIONS:
            raise ValueError(f"MODEL.MASK_FROZEN.MASK_REGION={region!r}; expected one of {MASK_REGIONS}")
        self.region = region
        self.neck = neck
        self.image_encoder = image_encoder
        self.box_encoder = box_encoder
        self.query_encoder = query_encoder
        self.mask_embed = mask_embed
        self.scoring_head = scoring_head
        self.roi_size = roi_size
        self.c1_stride = c1_stride
        self.roi_sampling_ratio = roi_sampling_ratio

    def mask_features(self, c1: torch.Tensor, out: DeformableTransformerOutput) -> torch.Tensor:
        """F = Neck(C1) + interpolate(F_e(E)) at the resolution of C1."""
        c1 = self.neck(c1)
        e1 = self.image_encoder(out)
        return c1 + F.interpolate(e1, size=c1.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, c1: torch.Tensor, out: DeformableTransformerOutput, queries: torch.Tensor,
                boxes: torch.Tensor) -> MaskPredictions:
        """``c1 [B, C, H/s, W/s]``, ``queries [B, N, d]``, ``boxes [B, N, 4]`` XYXY input pixels."""
        features = self.mask_features(c1, out)
        scale = 1.0 / self.c1_stride
        mapped = self.box_encoder.map_channels(features)
        rois = self.box_encoder(roi_align_per_query(mapped, boxes, self.roi_size, scale, self.roi_sampling_ratio))
        queries = self.query_encoder(queries, rois)
        embed = self.mask_embed(queries)
        flat_boxes = boxes.flatten(0, 1)
        if self.region == "box":
            logits = torch.einsum("mc,mchw->mhw", embed.flatten(0, 1), rois)[:, None]
            roi_probs = logits.detach().sigmoid()
        else:
            logits = torch.einsum("bnc,bchw->bnhw", embed, features).flatten(0, 1)[:, None]
            roi_probs = roi_align_per_mask(logits.detach().sigmoid()[:, 0], flat_boxes, self.roi_size, scale,
                                           self.roi_sampling_ratio)
        iou = self.scoring_head(roi_probs, rois) if self.scoring_head is not None else None
        return MaskPredictions(self.region, logits, flat_boxes, roi_probs, iou)


def build_mask_embed(dim: int, out_dim: int, num_layers: int) -> nn.Module:
    """e_i = MLP(q_i) with ``num_layers`` linear layers (0: identity, needs out_dim == dim)."""
    if num_layers == 0:
        if out_dim != dim:
            raise ValueError(f"MODEL.MASK_FROZEN.MASK_EMBED_LAYERS=0 needs mask features of the query size {dim}, "
                             f"got {out_dim} (set BOX_ENCODER.DIM = the detector's HIDDEN_DIM or use >= 1 layer)")
        return nn.Identity()
    return MLP(dim, dim, out_dim, num_layers)
