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

from maskfrozen.layers.deformable_encoder import EncoderOutput
from maskfrozen.layers.transformer_blocks import MLP

from .roi_ops import roi_align_per_query

__all__ = ["NECKS", "MaskPredictions", "C1Neck", "MaskNetwork", "build_mask_embed"]

NECKS = ("conv_gn", "linear")


@dataclass
class MaskPredictions:
    """Mask network outputs for the B*N selected queries (image-major)."""

    logits: torch.Tensor  # [B*N, 1, h, w] on each box's S x S grid ("box") or over the padded image at 1/stride
    boxes: torch.Tensor  # [B*N, 4] XYXY in input pixels
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
        region: where masks are predicted (:mod:`.mask_region`: "box", the paper's final
            design, or "image", the baseline).
        neck: C1 -> d. image_encoder: F_e, detector output -> refined E1 ``[B, d, ., .]``.
        box_encoder: F_b with ``out_channels`` d_b. query_encoder: queries x RoIs -> queries.
        mask_embed: MLP q_i -> e_i (d_b channels for "box", d for "image").
        scoring_head: :class:`MaskIoUHead` or None.
    The RoI geometry (size S, stride of C1, RoIAlign sampling ratio) is the region's.
    """

    def __init__(self, *, region, neck: nn.Module, image_encoder: nn.Module, box_encoder: nn.Module,
                 query_encoder: nn.Module, mask_embed: nn.Module, scoring_head: Optional[nn.Module]):
        super().__init__()
        self.region = region
        self.neck = neck
        self.image_encoder = image_encoder
        self.box_encoder = box_encoder
        self.query_encoder = query_encoder
        self.mask_embed = mask_embed
        self.scoring_head = scoring_head

    def mask_features(self, c1: torch.Tensor, encoded: EncoderOutput) -> torch.Tensor:
        """F = Neck(C1) + interpolate(F_e(E)) at the resolution of C1."""
        c1 = self.neck(c1)
        e1 = self.image_encoder(encoded)
        return c1 + F.interpolate(e1, size=c1.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, c1: torch.Tensor, encoded: EncoderOutput, queries: torch.Tensor,
                boxes: torch.Tensor) -> MaskPredictions:
        """``c1 [B, C, H/s, W/s]``, the detector's encoder output, ``queries [B, N, d]``,
        ``boxes [B, N, 4]`` XYXY input pixels."""
        region = self.region
        features = self.mask_features(c1, encoded)
        mapped = self.box_encoder.map_channels(features)
        rois = self.box_encoder(roi_align_per_query(mapped, boxes, region.roi_size, 1.0 / region.c1_stride,
                                                    region.roi_sampling_ratio))
        embed = self.mask_embed(self.query_encoder(queries, rois))
        flat_boxes = boxes.flatten(0, 1)
        logits = region.logits(embed, rois, features)
        iou = self.scoring_head(region.roi_probs(logits, flat_boxes), rois) if self.scoring_head is not None else None
        return MaskPredictions(logits, flat_boxes, iou)


def build_mask_embed(dim: int, out_dim: int, num_layers: int) -> nn.Module:
    """e_i = MLP(q_i) with ``num_layers`` linear layers (0: identity, needs out_dim == dim)."""
    if num_layers == 0:
        if out_dim != dim:
            raise ValueError(f"MODEL.MASK_FROZEN.MASK_EMBED_LAYERS=0 needs mask features of the query size {dim}, "
                             f"got {out_dim} (set BOX_ENCODER.DIM = the detector's HIDDEN_DIM or use >= 1 layer)")
        return nn.Identity()
    return MLP(dim, dim, out_dim, num_layers)
