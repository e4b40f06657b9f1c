"""The interface between the parts of the query-based mask meta-architecture.

``QuerySegmentor``: backbone -> pixel decoder -> transformer decoder -> shared criterion
(training) or shared instance post-processing (inference). A new model (Mask2Former,
FastInst) is only a pixel decoder and a transformer decoder registered by name:

- a **pixel decoder** (``PIXEL_DECODER_REGISTRY``, built as ``cls(cfg, input_shape)`` from the
  backbone's output shapes) maps the backbone features to a :class:`PixelDecoderOutput` and
  describes it by ``output_spec() -> PixelDecoderSpec``;
- a **transformer decoder** (``TRANSFORMER_DECODER_REGISTRY``, built as ``cls(cfg, spec)``) maps
  that output (and, in training, :class:`TrainingInputs`: the targets and the criterion's
  matcher) to a :class:`DecoderOutput`: the main predictions with their deep-supervision
  layers, optional extra query sets (e.g. FastInst's GT-mask-guided set: a fixed-assignment
  ``QuerySet`` built from the last layer's Hungarian indices) and optional extra losses
  (e.g. FastInst's query-proposal loss), all of which the meta-arch hands to the one
  ``SetCriterion``.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from maskfrozen.modeling.criterion import HungarianMatcher, QuerySet
from maskfrozen.modeling.criterion.matcher import CostFn

__all__ = ["PixelDecoderSpec", "PixelDecoderOutput", "TrainingInputs", "DecoderOutput", "TransformerDecoderBase"]


@dataclass(frozen=True)
class PixelDecoderSpec:
    """What a transformer decoder needs to know to be built on a pixel decoder."""

    feature_channels: int  # C of every multi-scale feature map
    mask_dim: int  # D of the per-pixel mask embedding
    feature_strides: Sequence[int]  # stride of each multi-scale level, coarsest first
    mask_stride: Optional[int] = 4  # stride of the mask features (None: the decoder makes its own)


@dataclass
class PixelDecoderOutput:
    """Pixel decoder result for a batch of ``N`` padded images."""

    # [N, D, H/4, W/4] per-pixel embeddings F (masks = e_q . F); None when the transformer
    # decoder projects its own (FastInst: per-layer projections of its refined 1/8 pixels)
    mask_features: Optional[torch.Tensor]
    multi_scale_features: List[torch.Tensor]  # per level [N, C, H_l, W_l], coarsest first (1/32, 1/16, 1/8)


@dataclass
class TrainingInputs:
    """Given to the transformer decoder in training only (inference never sees targets)."""

    targets: Sequence[Mapping[str, torch.Tensor]]  # per image labels [T], masks [T, H, W] over the padded image
    matcher: HungarianMatcher  # the criterion's matcher (FastInst's GT-guided set reuses its assignment)


@dataclass
class DecoderOutput:
    """Transformer decoder result.

    ``outputs``: the criterion's main query set: ``pred_logits [N, Q, K+1]``, ``pred_masks
    [N, Q, h, w]`` (mask logits over the padded image at the mask-feature stride) of the last
    layer and ``aux_outputs`` (the same per earlier layer, deep supervision); inference reads
    only ``pred_logits`` / ``pred_masks``.
    ``extra_query_sets``: more criterion entries (distinct suffixes), training only.
    ``extra_losses``: already weighted losses added to the criterion's, training only.
    """

    outputs: Dict
    extra_query_sets: List[QuerySet] = field(default_factory=list)
    extra_losses: Dict[str, torch.Tensor] = field(default_factory=dict)


class TransformerDecoderBase(torch.nn.Module):
    """Base of the registered transformer decoders: ``forward(pixels, training=None) ->
    DecoderOutput`` (``training`` is a :class:`TrainingInputs` in training, else None)."""

    def extra_matcher_costs(self) -> Dict[str, Tuple[float, CostFn]]:
        """More weighted Hungarian costs by name (e.g. FastInst's location cost); their
        functions read the decoder's own keys of ``outputs``. None by default."""
        return {}
