"""FastInst's dual-path transformer decoder (``FastInstDecoder``) with IA-guided queries and
GT-mask-guided learning, on the shared attention / FFN layers.

Queries Q_0 = the N instance-activation-guided pixels of the 1/16 map (+ ``NUM_AUX_QUERIES``
learnable auxiliary queries that predict nothing); pixels X_0 = the 1/8 map. Positions: a
learnable ``s x s`` embedding (s = round(sqrt(N))) resized to each map. Layer l:

    X_l = FFN(CrossAttn(X_{l-1} -> Q_{l-1}))                      (pixel path)
    Q_l = FFN(SelfAttn(MaskedCrossAttn(Q_{l-1} -> X_l; M_{l-1})))  (query path)

Prediction j (j = 0..L, on (Q_j, X_j)): ``e = LN_j(Q)``, class ``MLP_j(e) -> K+1``, masks
``MLPmask_j(e) . Linear_j(X)`` at 1/8; M_j = [sigmoid(mask) < 0.5]. At inference only the
last class head runs. GT-mask-guided learning (training only): with the last layer's
Hungarian assignment, each layer l is run again with the matched GT masks as attention masks,
on its own output (Q_l, X_l) as the official code does (``GT_GUIDED_ON_LAYER_INPUT``, ours,
off: on its input (Q_{l-1}, X_{l-1}), as the paper describes it); its predictions form the
``_gt`` query set, supervised with that fixed assignment.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from maskfrozen.layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from maskfrozen.modeling.criterion import HungarianMatcher, QuerySet
from maskfrozen.modeling.criterion.matcher import CostFn, default_cost_fns
from maskfrozen.modeling.registries import TRANSFORMER_DECODER_REGISTRY

from ..attention_masks import attention_mask_from_gt, attention_mask_from_masks
from ..interface import DecoderOutput, PixelDecoderOutput, PixelDecoderSpec, TrainingInputs, TransformerDecoderBase
from .query_proposal import InstanceActivationQueries, Proposals, proposal_loss

__all__ = ["FastInstDecoder", "DualPathLayer"]

State = Tuple[torch.Tensor, torch.Tensor]  # (queries [B, N+A, C], pixels [B, hw, C])


class DualPathLayer(nn.Module):
    """One decoder layer: the pixel path, then the query path (see module doc)."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.pixel_cross_attention = CrossAttentionLayer(dim, nheads, dropout, pre_norm)
        self.pixel_ffn = FFNLayer(dim, dim_feedforward, dropout, normalize_before=pre_norm)
        self.query_cross_attention = CrossAttentionLayer(dim, nheads, dropout, pre_norm)
        self.query_self_attention = SelfAttentionLayer(dim, nheads, dropout, pre_norm)
        self.query_ffn = FFNLayer(dim, dim_feedforward, dropout, normalize_before=pre_norm)

    def forward(self, state: State, query_pos: torch.Tensor, pixel_pos: torch.Tensor,
                attn_mask: torch.Tensor) -> State:
        queries, pixels = state
        pixels = self.pixel_ffn(self.pixel_cross_attention(pixels, queries, pixel_pos, query_pos))
        queries = self.query_cross_attention(queries, pixels, query_pos, pixel_pos, attn_mask=attn_mask)
        queries = self.query_ffn(self.query_self_attention(queries, query_pos))
        return queries, pixels


class _PredictionHead(nn.Module):
    """LN, class MLP and mask MLP on the queries, linear projection of the pixels."""

    def __init__(self, dim: int, mask_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.class_embed = MLP(dim, dim, num_classes + 1, 3)
        self.mask_embed = MLP(dim, dim, mask_dim, 3)
        self.pixel_proj = nn.Linear(dim, mask_dim)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor, size: Tuple[int, int],
                with_class: bool) -> Dict[str, torch.Tensor]:
        e = self.norm(queries)
        masks = torch.einsum("bqc,blc->bql", self.mask_embed(e), self.pixel_proj(pixels))
        out = {"pred_masks": masks.unflatten(2, size)}
        if with_class:
            out["pred_logits"] = self.class_embed(e)
        return out


@TRANSFORMER_DECODER_REGISTRY.register()
class FastInstDecoder(TransformerDecoderBase):
    """Dual-path decoder with IA-guided queries and GT-mask-guided learning (module doc)."""

    @configurable
    def __init__(self, spec: PixelDecoderSpec, *, num_classes: int, hidden_dim: int, num_queries: int,
                 num_aux_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool = False,
                 dropout: float = 0.0, class_weight: float = 2.0, location_weight: float = 1000.0,
                 proposal_weight: float = 20.0, gt_guided: bool = True, attn_mask_dilation: int = 0,
                 cell_centre_locations: bool = False, gt_guided_on_layer_input: bool = False):
        super().__init__()
        if spec.feature_channels != hidden_dim or len(spec.feature_strides) != 3:
            raise ValueError(f"FastInstDecoder: the pixel decoder must give 3 levels of HIDDEN_DIM={hidden_dim} "
                             f"channels (SEM_SEG_HEAD.CONVS_DIM), got {len(spec.feature_strides)} of "
                             f"{spec.feature_channels}")
        self.num_queries, self.num_aux_queries, self.num_heads = num_queries, num_aux_queries, nheads
        self.location_weight, self.proposal_weight, self.gt_guided = location_weight, proposal_weight, gt_guided
        self.attn_mask_dilation = attn_mask_dilation
        self.gt_guided_on_layer_input = gt_guided_on_layer_input
        pos_size = int(round(num_queries ** 0.5))
        # official: torch.empty, never initialised; and our optimizer groups give it no weight decay
        # (a name with "embed"), where the official one decays it
        self.meta_pos_embed = nn.Parameter(torch.empty(hidden_dim, pos_size, pos_size).normal_(std=0.02))
        self.aux_query_feat = nn.Embedding(num_aux_queries, hidden_dim) if num_aux_queries else None
        self.aux_query_pos = nn.Embedding(num_aux_queries, hidden_dim) if num_aux_queries else None
        self.query_proposal = InstanceActivationQueries(hidden_dim, num_queries, num_classes, cell_centre_locations)
        self.layers = nn.ModuleList(DualPathLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
                                    for _ in range(dec_layers))
        self.heads = nn.ModuleList(_PredictionHead(hidden_dim, spec.mask_dim, num_classes)
                                   for _ in range(dec_layers + 1))
        self.proposal_matcher = HungarianMatcher({"class": class_weight, "location": location_weight},
                                                 class_cost="softmax")

    @classmethod
    def from_config(cls, cfg, spec: PixelDecoderSpec) -> Dict:
        f = cfg.MODEL.FASTINST
        if not cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION:
            raise ValueError("FastInstDecoder needs MODEL.MASK_FORMER.DEEP_SUPERVISION True: without it the per-layer "
                             "heads get no gradient (DDP rejects unused parameters) and the official code also "
                             "drops the GT-guided losses")
        if f.DEC_LAYERS < 1 or f.NUM_OBJECT_QUERIES < 1 or f.NUM_AUX_QUERIES < 0:
            raise ValueError(f"MODEL.FASTINST.DEC_LAYERS and NUM_OBJECT_QUERIES must be >= 1 and NUM_AUX_QUERIES "
                             f">= 0, got {f.DEC_LAYERS} / {f.NUM_OBJECT_QUERIES} / {f.NUM_AUX_QUERIES}")
        return {
            "spec": spec, "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "hidden_dim": f.HIDDEN_DIM,
            "num_queries": f.NUM_OBJECT_QUERIES, "num_aux_queries": f.NUM_AUX_QUERIES, "nheads": f.NHEADS,
            "dim_feedforward": f.DIM_FEEDFORWARD, "dec_layers": f.DEC_LAYERS, "pre_norm": f.PRE_NORM,
            "class_weight": cfg.MODEL.MASK_FORMER.CLASS_WEIGHT,  # no dropout (official: 0 fixed, DROPOUT unused)
            "location_weight": f.LOCATION_WEIGHT, "proposal_weight": f.PROPOSAL_WEIGHT, "gt_guided": f.GT_GUIDED,
            "attn_mask_dilation": cfg.MODEL.MASK_FORMER.ATTN_MASK_DILATION,
            "cell_centre_locations": f.LOCATIONS_AT_CELL_CENTRES, "gt_guided_on_layer_input": f.GT_GUIDED_ON_LAYER_INPUT,
        }

    def extra_matcher_costs(self) -> Dict[str, Tuple[float, CostFn]]:
        return {"location": (self.location_weight, default_cost_fns()["location"])}

    def _positions(self, size: Tuple[int, int]) -> torch.Tensor:
        """``[C, h, w]`` learnable positions resized to a map."""
        return F.interpolate(self.meta_pos_embed[None], size=size, mode="bilinear", align_corners=False)[0]

    def initial_state(self, pixels: PixelDecoderOutput) -> Tuple[State, torch.Tensor, torch.Tensor, Proposals]:
        """(Q_0, X_0), their positions, the proposal locations [B, N, 2] and logits."""
        proposal_map, pixel_map = pixels.multi_scale_features[1], pixels.multi_scale_features[2]
        proposals = self.query_proposal(proposal_map, self._positions(tuple(proposal_map.shape[-2:])))
        queries, query_pos = proposals.features, proposals.pos
        if self.num_aux_queries:
            batch = pixel_map.shape[0]
            queries = torch.cat([queries, self.aux_query_feat.weight[None].expand(batch, -1, -1)], dim=1)
            query_pos = torch.cat([query_pos, self.aux_query_pos.weight[None].expand(batch, -1, -1)], dim=1)
        pixel_pos = self._positions(tuple(pixel_map.shape[-2:])).flatten(1).t()[None]
        return (queries, pixel_map.flatten(2).transpose(1, 2)), query_pos, pixel_pos, proposals

    def predict(self, j: int, state: State, size: Tuple[int, int], with_class: bool) -> Dict[str, torch.Tensor]:
        """Prediction j of the N predicting queries (auxiliary queries excluded)."""
        return self.heads[j](state[0][:, :self.num_queries], state[1], size, with_class)

    def forward(self, pixels: PixelDecoderOutput, training: Optional[TrainingInputs] = None) -> DecoderOutput:
        size = tuple(pixels.multi_scale_features[2].shape[-2:])
        state, query_pos, pixel_pos, proposals = self.initial_state(pixels)
        last = len(self.layers)
        states = [state]
        predictions = [self.predict(0, state, size, with_class=training is not None or last == 0)]
        for i, layer in enumerate(self.layers):
            attn_mask = attention_mask_from_masks(predictions[-1]["pred_masks"], size, self.num_heads,
                                                  self.num_aux_queries, self.attn_mask_dilation)
            state = layer(state, query_pos, pixel_pos, attn_mask)
            states.append(state)
            predictions.append(self.predict(i + 1, state, size, with_class=training is not None or i + 1 == last))
        if training is None:
            return DecoderOutput(predictions[-1])
        for p in predictions:
            p["query_locations"] = proposals.locations
        main = {**predictions[-1], "aux_outputs": predictions[:-1]}
        losses = {"loss_proposal": self.proposal_weight * proposal_loss(proposals.logits, training.targets,
                                                                         self.proposal_matcher)}
        extra_sets = [self.gt_guided_set(states, query_pos, pixel_pos, size, predictions[-1], training)] \
            if self.gt_guided else []
        return DecoderOutput(main, extra_sets, losses)

    def gt_guided_set(self, states: List[State], query_pos: torch.Tensor, pixel_pos: torch.Tensor,
                      size: Tuple[int, int], last: Dict[str, torch.Tensor], training: TrainingInputs) -> QuerySet:
        """Each layer i re-run on its output ``states[i + 1]`` (official; on its input ``states[i]``
        with GT_GUIDED_ON_LAYER_INPUT) with the last layer's matched GT masks as attention masks;
        a fixed-assignment query set (suffix ``_gt``)."""
        indices = training.matcher(last, training.targets)
        attn_mask = attention_mask_from_gt(indices, training.targets, self.num_queries, size, self.num_heads,
                                           self.num_aux_queries)
        offset = 0 if self.gt_guided_on_layer_input else 1
        guided = [self.predict(i + 1, layer(states[i + offset], query_pos, pixel_pos, attn_mask), size,
                               with_class=True) for i, layer in enumerate(self.layers)]
        return QuerySet({**guided[-1], "aux_outputs": guided[:-1]}, suffix="_gt", indices=indices)
