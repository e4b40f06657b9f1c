"""Mask2Former's ``MultiScaleMaskedTransformerDecoder`` on the shared attention / FFN layers.

N learnable query features X_0 and positions P. Layer l (l = 1..L, L = DEC_LAYERS - 1 as in
the official config) reads level ``(l - 1) mod 3`` of the pixel decoder (1/32, 1/16, 1/8, ...)
with sine positions, the level embedding added to its features:

    X_l = FFN(SelfAttn(MaskedCrossAttn(X_{l-1}, V_lvl; M_{l-1}))),

where the attention mask M_{l-1}(q, p) = [sigmoid(mask_{l-1}(q) at p) < 0.5] comes from the
previous prediction resized to the level (True = may not attend; a query whose mask is
empty attends everywhere). Predictions of every X_l (l = 0..L) after a shared LayerNorm:
class ``Linear(X) -> K+1`` and mask ``MLP(X) . F`` (F: mask features at 1/4): deep
supervision on all of them.
"""
from typing import Dict, List, Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from torch import nn

from maskfrozen.layers import MLP, CrossAttentionLayer, FFNLayer, PositionEmbeddingSine, SelfAttentionLayer
from maskfrozen.modeling.registries import TRANSFORMER_DECODER_REGISTRY

from ..attention_masks import attention_mask_from_masks
from ..interface import DecoderOutput, PixelDecoderOutput, PixelDecoderSpec, TrainingInputs, TransformerDecoderBase

__all__ = ["MultiScaleMaskedTransformerDecoder", "attention_mask_from_masks"]


class _FlattenedLevels:
    """Per level: value tokens ``[B, HW, C]`` (+ level embedding), sine positions, size."""

    def __init__(self, features: List[torch.Tensor], projections: nn.ModuleList, level_embed: nn.Embedding,
                 position: PositionEmbeddingSine):
        self.src, self.pos, self.sizes = [], [], []
        for i, x in enumerate(features):
            mask = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
            self.sizes.append(tuple(x.shape[-2:]))
            self.pos.append(position(mask).to(x.dtype).flatten(2).transpose(1, 2))
            self.src.append((projections[i](x).flatten(2) + level_embed.weight[i][None, :, None]).transpose(1, 2))


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(TransformerDecoderBase):
    """Masked-attention transformer decoder (see module doc)."""

    @configurable
    def __init__(self, spec: PixelDecoderSpec, *, num_classes: int, hidden_dim: int, num_queries: int, nheads: int,
                 dim_feedforward: int, dec_layers: int, pre_norm: bool = False, dropout: float = 0.0,
                 enforce_input_project: bool = False, attn_mask_dilation: int = 0):
        super().__init__()
        if spec.mask_stride is None:
            raise ValueError("MultiScaleMaskedTransformerDecoder needs the pixel decoder's mask features, but "
                             "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME gives none (e.g. FastInst's PyramidPoolingModuleFPN): "
                             "pair it with MSDeformAttnPixelDecoder (MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME)")
        self.num_heads, self.num_layers = nheads, dec_layers
        self.attn_mask_dilation = attn_mask_dilation
        self.num_feature_levels = len(spec.feature_strides)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers))
        self.ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, normalize_before=pre_norm) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # X_0
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # P
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(self._input_proj(spec.feature_channels, hidden_dim, enforce_input_project)
                                        for _ in range(self.num_feature_levels))
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, spec.mask_dim, 3)

    @staticmethod
    def _input_proj(in_channels: int, hidden_dim: int, enforce: bool) -> nn.Module:
        if in_channels == hidden_dim and not enforce:
            return nn.Identity()
        conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        weight_init.c2_xavier_fill(conv)
        return conv

    @classmethod
    def from_config(cls, cfg, spec: PixelDecoderSpec) -> Dict:
        m = cfg.MODEL.MASK_FORMER
        if m.DEC_LAYERS < 1 or m.NUM_OBJECT_QUERIES < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS (layers + 1) and NUM_OBJECT_QUERIES must be >= 1, got "
                             f"{m.DEC_LAYERS} / {m.NUM_OBJECT_QUERIES}")
        return {
            "spec": spec, "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "hidden_dim": m.HIDDEN_DIM,
            "num_queries": m.NUM_OBJECT_QUERIES, "nheads": m.NHEADS, "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS - 1,  # official: one of DEC_LAYERS is the prediction on X_0
            "pre_norm": m.PRE_NORM, "enforce_input_project": m.ENFORCE_INPUT_PROJ,  # no dropout (official: 0 fixed)
            "attn_mask_dilation": m.ATTN_MASK_DILATION,
        }

    def prediction_heads(self, x: torch.Tensor, mask_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Class logits ``[B, Q, K+1]`` and mask logits ``[B, Q, H/4, W/4]`` of queries ``x``."""
        x = self.decoder_norm(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        return {"pred_logits": self.class_embed(x), "pred_masks": masks}

    def forward(self, pixels: PixelDecoderOutput, training: Optional[TrainingInputs] = None) -> DecoderOutput:
        levels = _FlattenedLevels(pixels.multi_scale_features, self.input_proj, self.level_embed,
                                  self.position_embedding)
        batch = pixels.mask_features.shape[0]
        x = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        predictions = [self.prediction_heads(x, pixels.mask_features)]
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            attn_mask = attention_mask_from_masks(predictions[-1]["pred_masks"], levels.sizes[lvl], self.num_heads,
                                                  dilation=self.attn_mask_dilation)
            x = self.cross_attention_layers[i](x, levels.src[lvl], query_pos, levels.pos[lvl], attn_mask=attn_mask)
            x = self.self_attention_layers[i](x, query_pos)
            x = self.ffn_layers[i](x)
            predictions.append(self.prediction_heads(x, pixels.mask_features))
        return DecoderOutput({**predictions[-1], "aux_outputs": predictions[:-1]})
