"""Deformable transformer (Deformable-DETR / DINO / H-DETR) with a structured output.

Encoder: L multi-scale deformable self-attention layers over the flattened feature
levels. Decoder: self-attention -> deformable cross-attention -> FFN (post-norm), with
per-layer class/box heads, iterative box refinement and two-stage proposals. The
variants are options, not subclasses:

===================  ===========  ==========  ===============  ==================  ============
variant              two_stage    box_refine  mixed_selection  query_pos           look_fwd_2x
===================  ===========  ==========  ===============  ==================  ============
Deformable-DETR      False        False       False            "static" (learned)  False
  + refine / 2-stage  -/True       True        False            "static"            False
H-DETR               True         True        True             "static"            True
DINO                 True         True        True (tgt_embed) "dynamic"           True
===================  ===========  ==========  ===============  ==================  ============

"static": the query position comes once from the learned query embedding or from the
proposal boxes (Linear+LN of their sine embedding); "dynamic" (DINO, conditional):
each layer recomputes it as MLP(sine(reference box)), the reference scaled by level 0's
valid ratio as in the official DINO (``query_pos_reference="image"``: the image-normalised
box, padding-invariant). ``share_decoder_heads`` (DINO) uses one class / box head for every
decoder layer; ``inverse_sigmoid_eps`` is the refinement's logit clamp (DINO 1e-3).

Two-stage selection ranks every encoder token, as the official code: padded tokens and
tokens whose proposal lies outside (0.01, 0.99) only get invalid (+inf) boxes
(``proposals_valid_only`` = ours: they are never selected). An image with fewer encoder
tokens than queries (the official code fails there) selects every token and pads the rest
with masked queries (no other query attends to them, they score 0 at inference). The
encoder proposals of every token stay in the output (:class:`EncoderProposals`) for the
encoder loss, which covers all tokens (Deformable-DETR, H-DETR) or the selected ones (DINO).

The transformer runs in stages, each with a small structured output, so heads can attach
to any of them (Co-DETR's auxiliary heads on the memory, extra query groups through the
same decoder, Mask2Former's pixel decoder on the encoder alone):

    encode(srcs, masks, pos) -> EncoderOutput          (memory + level geometry)
    select(encoded, denoising) -> DecoderQueries       (initial queries, groups, masks)
    decode(encoded, queries) -> DecoderOutput          (per-layer states, logits, boxes)

``forward`` chains them into one :class:`DeformableTransformerOutput`.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from maskfrozen.layers.attention import DeformableAttentionLayer, FFNLayer, SelfAttentionLayer
from maskfrozen.layers.box_ops import inverse_sigmoid
from maskfrozen.layers.deformable_encoder import (DeformableEncoder, EncoderOutput, flatten_levels, pixel_centres,
                                                  valid_sizes)
from maskfrozen.layers.ms_deform_attn import MSDeformAttn
from maskfrozen.layers.position_encoding import sine_embedding
from maskfrozen.layers.transformer_blocks import MLP, gather_tokens

from .denoising import DenoisingQueries
from .query_groups import query_self_attention_mask, query_slices

__all__ = ["DeformableTransformer", "DeformableTransformerOutput", "DecoderQueries", "DecoderOutput",
           "EncoderProposals"]


@dataclass
class EncoderProposals:
    """Two-stage proposals of every encoder token and the ones selected as queries."""

    logits: torch.Tensor  # [N, S, K] class logits of every token (the two-stage head)
    boxes: torch.Tensor  # [N, S, 4] sigmoid boxes (1 where invalid: +inf offsets)
    index: torch.Tensor  # [N, Q_sel] selected tokens, best first
    padding: Optional[torch.Tensor] = None  # [N, Q_sel] True = padded selection (too few tokens)

    @property
    def selected_logits(self) -> torch.Tensor:
        return gather_tokens(self.logits, self.index)

    @property
    def selected_boxes(self) -> torch.Tensor:
        return gather_tokens(self.boxes, self.index)


@dataclass
class DecoderQueries:
    """The decoder's input queries (Q of them, laid out as ``query_groups``)."""

    content: torch.Tensor  # [N, Q, C]
    reference: torch.Tensor  # [N, Q, 2 or 4] initial references (sigmoid space)
    query_groups: Dict[str, slice]  # "dn", "one2one", "one2many" (see query_groups.py)
    query_pos: Optional[torch.Tensor] = None  # [N, Q, C] static position (None: dynamic, DINO)
    self_attn_mask: Optional[torch.Tensor] = None  # [Q, Q] bool, True = may not attend
    padding: Optional[torch.Tensor] = None  # [N, Q] bool, True = padded query (too few tokens)
    proposals: Optional[EncoderProposals] = None  # two-stage: every token's proposal, the selection


@dataclass
class DecoderOutput:
    """One entry per decoder layer (D layers)."""

    hidden_states: torch.Tensor  # [D, N, Q, C] (after the final norm)
    pred_logits: torch.Tensor  # [D, N, Q, K]
    pred_boxes: torch.Tensor  # [D, N, Q, 4] normalised (cx, cy, w, h)


@dataclass
class DeformableTransformerOutput(EncoderOutput):
    """Everything a head may attach to: the encoder output (memory, spatial shapes, level
    start index, valid ratios, padding mask) and the decoder's per-layer predictions.
    S = sum_l H_l * W_l, Q = all decoder queries (``query_groups``), D = decoder layers."""

    hidden_states: torch.Tensor  # [D, N, Q, C]
    pred_logits: torch.Tensor  # [D, N, Q, K]
    pred_boxes: torch.Tensor  # [D, N, Q, 4]
    query_groups: Dict[str, slice] = field(default_factory=dict)
    query_padding: Optional[torch.Tensor] = None  # [N, Q] bool, True = padded query
    proposals: Optional[EncoderProposals] = None  # two-stage proposals (see EncoderProposals)

    @classmethod
    def assemble(cls, encoded: EncoderOutput, queries: DecoderQueries, decoded: DecoderOutput):
        return cls(**vars(encoded.geometry()), memory=encoded.memory, **vars(decoded),
                   query_groups=queries.query_groups, query_padding=queries.padding, proposals=queries.proposals)

    @property
    def final_queries(self) -> torch.Tensor:
        """``[N, Q1, C]`` last-layer embeddings of the one-to-one queries."""
        return self.hidden_states[-1][:, self.query_groups["one2one"]]

    @property
    def final_scores(self) -> torch.Tensor:
        """``[N, Q1, K]`` last-layer sigmoid class scores of the one-to-one queries (0 for
        padded queries)."""
        scores = self.pred_logits[-1][:, self.query_groups["one2one"]].sigmoid()
        if self.query_padding is not None:
            scores = scores.masked_fill(self.query_padding[:, self.query_groups["one2one"], None], 0.0)
        return scores

    @property
    def final_boxes(self) -> torch.Tensor:
        """``[N, Q1, 4]`` last-layer boxes of the one-to-one queries."""
        return self.pred_boxes[-1][:, self.query_groups["one2one"]]


# ----------------------------------------------------------------------------- layers
class DeformableDecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention to the memory -> FFN (post-norm)."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_levels, num_points):
        super().__init__()
        self.self_attn = SelfAttentionLayer(d_model, nhead, dropout)
        self.cross_attn = DeformableAttentionLayer(d_model, nhead, num_levels, num_points, dropout)
        self.ffn = FFNLayer(d_model, dim_feedforward, dropout, activation)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                encoded: EncoderOutput, self_attn_mask: Optional[torch.Tensor] = None,
                query_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        tgt = self.self_attn(tgt, query_pos, self_attn_mask, query_padding)
        tgt = self.cross_attn(tgt, query_pos, reference_points, encoded.memory, encoded.spatial_shapes,
                              encoded.level_start_index, encoded.padding_mask)
        return self.ffn(tgt)


# ----------------------------------------------------------------------------- helpers
def encoder_proposals(encoded: EncoderOutput) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-stage proposals: a box of size 0.05 * 2^l centred on every valid token.

    Returns:
        proposals_unact ``[N, S, 4]`` (inverse sigmoid; +inf where invalid),
        valid ``[N, S]`` bool (not padding and well inside (0.01, 0.99)),
        memory with invalid tokens zeroed.
    """
    props = []
    for lvl, size in enumerate(encoded.level_sizes()):
        valid = valid_sizes(encoded, lvl, size)
        centres = pixel_centres(*size, encoded.memory.device)[None] / valid[:, None, :]
        sizes = torch.full_like(centres, 0.05 * (2.0**lvl))
        props.append(torch.cat([centres, sizes], -1))
    proposals = torch.cat(props, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~encoded.padding_mask
    proposals_unact = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return proposals_unact, valid, encoded.memory.masked_fill(~valid[..., None], 0.0)


def _apply_box_delta(delta: torch.Tensor, reference: torch.Tensor, eps: float) -> torch.Tensor:
    """sigmoid(delta + logit(reference)) (logit clamped by ``eps``); a 2-D reference only
    shifts the centre."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]], -1).sigmoid()


def _scale_reference(reference: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """``[N, Q, 2|4]`` image-normalised reference -> ``[N, Q, L, 2|4]`` per padded level."""
    ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
    return reference[:, :, None] * ratios[:, None]


def _topk_padded(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Indices ``[N, k]`` of the top-k scores over dim 1; when fewer than k tokens exist,
    all of them, then copies of the last one, with a ``[N, k]`` padding mask (else None)."""
    available = scores.shape[1]
    if available >= k:  # (not min(k, available): while exporting, a symbolic Min(k, S) query count)
        return scores.topk(k, dim=1).indices, None
    index = scores.topk(available, dim=1).indices
    fill = index[:, -1:].expand(-1, k - available)
    padding = torch.zeros(index.shape[0], k, dtype=torch.bool, device=index.device)
    padding[:, available:] = True
    return torch.cat([index, fill], 1), padding


# ----------------------------------------------------------------------------- modules
class DeformableDecoder(nn.Module):
    """Decoder layers + per-layer predictions (iterative refinement, look-forward-twice)."""

    def __init__(self, num_layers: int, d_model: int, query_pos: str, final_norm: bool, box_refine: bool,
                 look_forward_twice: bool, query_pos_reference: str = "level0", inverse_sigmoid_eps: float = 1e-5,
                 **layer_kwargs):
        super().__init__()
        if query_pos not in ("static", "dynamic"):
            raise ValueError(f"DeformableDecoder: query_pos must be 'static' or 'dynamic', got {query_pos!r}")
        if query_pos_reference not in ("level0", "image"):
            raise ValueError(f"DeformableDecoder: query_pos_reference must be 'level0' or 'image', "
                             f"got {query_pos_reference!r}")
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model=d_model, **layer_kwargs) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if query_pos == "dynamic" else None
        self.d_model = d_model
        self.box_refine = box_refine
        self.look_forward_twice = look_forward_twice
        self.query_pos_reference = query_pos_reference
        self.eps = inverse_sigmoid_eps

    def forward(self, queries: DecoderQueries, encoded: EncoderOutput, class_embed: nn.ModuleList,
                bbox_embed: nn.ModuleList, head_of_layer=lambda lid: lid) -> DecoderOutput:
        """Run every layer from ``queries`` (two-stage proposals come detached; learned
        one-stage references keep their gradient); layer ``lid`` predicts with the heads
        ``class_embed[head_of_layer(lid)]`` / ``bbox_embed[...]``."""
        hidden, logits, boxes = [], [], []
        tgt, reference, query_pos = queries.content, queries.reference, queries.query_pos
        pred_reference = reference
        for lid, layer in enumerate(self.layers):
            scaled = _scale_reference(reference, encoded.valid_ratios)
            if self.ref_point_head is not None:
                position = scaled[:, :, 0] if self.query_pos_reference == "level0" else reference
                query_pos = self.ref_point_head(sine_embedding(position, self.d_model // 2))
            tgt = layer(tgt, query_pos, scaled, encoded, queries.self_attn_mask, queries.padding)
            hs = self.norm(tgt)
            head = head_of_layer(lid)
            boxes.append(_apply_box_delta(bbox_embed[head](hs), pred_reference, self.eps))
            logits.append(class_embed[head](hs))
            hidden.append(hs)
            if self.box_refine:
                pred_reference, reference = self._refine(tgt, hs, boxes[-1], reference, bbox_embed[head])
        return DecoderOutput(torch.stack(hidden), torch.stack(logits), torch.stack(boxes))

    def _refine(self, tgt, hs, prediction, reference, box_head):
        """(reference of the next prediction, reference of the next layer). Refines from the
        un-normed output (DINO); that equals the prediction when there is no final norm
        and the prediction's reference is the detached one."""
        same_as_prediction = hs is tgt and not self.look_forward_twice
        refined = prediction if same_as_prediction else _apply_box_delta(box_head(tgt), reference, self.eps)
        return (refined if self.look_forward_twice else refined.detach()), refined.detach()


class DeformableTransformer(nn.Module):
    """Encoder + query selection + decoder + prediction heads (see module doc).

    Args (beyond the usual sizes):
        num_queries / num_queries_one2many: one-to-one queries; H-DETR's extra
            one-to-many queries (training only).
        two_stage, box_refine, mixed_selection, query_pos, look_forward_twice,
            decoder_final_norm: the variant (see the table above).
        proposal_score: rank encoder proposals by their best class ("max", DINO) or by
            logit 0 ("first", class-agnostic proposals of Deformable-DETR / H-DETR).
        proposals_valid_only: never select padded / border tokens (ours; official: False).
        share_decoder_heads: one class / box head for every decoder layer (DINO).
        query_pos_reference, inverse_sigmoid_eps: see :class:`DeformableDecoder`.

    Parameters named as in detrex where the structure matches (``level_embeds``,
    ``tgt_embed``, ``enc_output(_norm)``, ``class_embed.{i}``, ``bbox_embed.{i}``; the
    last entry of each head list is the encoder-proposal head when two-stage).
    """

    def __init__(
        self,
        num_classes: int,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        num_queries: int = 300,
        num_queries_one2many: int = 0,
        two_stage: bool = True,
        box_refine: bool = True,
        mixed_selection: bool = False,
        query_pos: str = "static",
        look_forward_twice: bool = False,
        decoder_final_norm: bool = False,
        proposal_score: str = "max",
        proposals_valid_only: bool = False,
        share_decoder_heads: bool = False,
        query_pos_reference: str = "level0",
        inverse_sigmoid_eps: float = 1e-5,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if query_pos == "dynamic" and not two_stage:
            raise ValueError("DeformableTransformer: query_pos='dynamic' (DINO) needs two_stage=True")
        if proposal_score not in ("max", "first"):
            raise ValueError(f"DeformableTransformer: proposal_score must be 'max' or 'first', got {proposal_score!r}")
        if not two_stage and num_queries_one2many:
            raise ValueError("DeformableTransformer: one-to-many queries need two_stage=True")
        self.d_model, self.num_classes = d_model, num_classes
        self.num_queries, self.num_queries_one2many = num_queries, num_queries_one2many
        self.two_stage, self.mixed_selection, self.query_pos_mode = two_stage, mixed_selection, query_pos
        self.proposal_score, self.proposals_valid_only = proposal_score, proposals_valid_only
        self.per_layer_heads = box_refine and not share_decoder_heads
        layer_kwargs = dict(nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                            num_levels=num_feature_levels)
        self.encoder = DeformableEncoder(num_encoder_layers, d_model=d_model, num_points=enc_n_points, **layer_kwargs)
        self.decoder = DeformableDecoder(num_decoder_layers, d_model, query_pos, decoder_final_norm, box_refine,
                                         look_forward_twice, query_pos_reference, inverse_sigmoid_eps,
                                         num_points=dec_n_points, **layer_kwargs)
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, d_model))
        total_queries = num_queries + num_queries_one2many
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            if query_pos == "static":
                self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
                self.pos_trans_norm = nn.LayerNorm(2 * d_model)
            if mixed_selection or query_pos == "dynamic":
                self.tgt_embed = nn.Embedding(total_queries, d_model)
        else:
            self.query_embed = nn.Embedding(total_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
        num_heads = (num_decoder_layers if self.per_layer_heads else 1) + int(two_stage)
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_heads))
        self._reset_parameters(prior_prob, two_stage)

    def _reset_parameters(self, prior_prob: float, two_stage: bool) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embeds)
        if hasattr(self, "tgt_embed"):
            nn.init.normal_(self.tgt_embed.weight)
        bias = -math.log((1 - prior_prob) / prior_prob)
        for head in self.class_embed:
            nn.init.constant_(head.bias, bias)
        for head in self.bbox_embed:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            if not two_stage:  # learned queries start as small boxes (Deformable-DETR)
                nn.init.constant_(head.layers[-1].bias[2:], -2.0)

    # ------------------------------------------------------------------ stages
    def encode(self, srcs: List[torch.Tensor], masks: List[torch.Tensor],
               pos_embeds: List[torch.Tensor]) -> EncoderOutput:
        """Flatten the levels (+ level embeddings) and run the encoder.

        Args: per level ``srcs [N, C, H_l, W_l]``, ``masks [N, H_l, W_l]`` bool (True =
        padding), ``pos_embeds [N, C, H_l, W_l]``.
        """
        src, pos, geometry = flatten_levels(srcs, masks, pos_embeds, self.level_embeds)
        return self.encoder(src, pos, geometry)

    def select(self, encoded: EncoderOutput, denoising: Optional[DenoisingQueries] = None) -> DecoderQueries:
        """The decoder's initial queries: one-to-one (+ one-to-many in training) from the
        encoder proposals (two-stage) or learned, with DINO's denoising queries in front."""
        num_one2many = self.num_queries_one2many if self.training else 0
        queries = self._matching_queries(encoded, self.num_queries + num_one2many)
        num_groups = group_size = 0
        if denoising is not None:
            if self.query_pos_mode != "dynamic":
                raise ValueError("DeformableTransformer: denoising queries need query_pos='dynamic' (DINO)")
            queries.content = torch.cat([denoising.content, queries.content], 1)
            queries.reference = torch.cat([denoising.boxes_unact.sigmoid(), queries.reference], 1)
            if queries.padding is not None:
                queries.padding = torch.cat([queries.padding.new_zeros(denoising.content.shape[:2]), queries.padding], 1)
            num_groups, group_size = denoising.num_groups, denoising.group_size
        queries.self_attn_mask = query_self_attention_mask(num_groups, group_size, self.num_queries, num_one2many,
                                                           encoded.memory.device)
        queries.query_groups = query_slices(num_groups * group_size, self.num_queries, num_one2many)
        return queries

    def decode(self, encoded: EncoderOutput, queries: DecoderQueries) -> DecoderOutput:
        """Run the decoder and its per-layer heads on ``queries`` over the memory."""
        return self.decoder(queries, encoded, self.class_embed, self.bbox_embed, self.head_of_layer)

    def head_of_layer(self, lid: int) -> int:
        """Index in ``class_embed`` / ``bbox_embed`` of decoder layer ``lid``'s heads."""
        return lid if self.per_layer_heads else 0

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                denoising: Optional[DenoisingQueries] = None) -> DeformableTransformerOutput:
        """``encode`` -> ``select`` -> ``decode`` (see :meth:`encode` for the inputs)."""
        encoded = self.encode(srcs, masks, pos_embeds)
        queries = self.select(encoded, denoising)
        return DeformableTransformerOutput.assemble(encoded, queries, self.decode(encoded, queries))

    # ------------------------------------------------------------------ query selection
    def _select_proposals(self, encoded: EncoderOutput, num_select: int) -> Tuple[EncoderProposals, torch.Tensor]:
        """Every token's proposal (the two-stage heads on the memory) and the top-scoring
        ones; returns them with the selected boxes' logits, detached (the decoder's initial
        references)."""
        proposals_unact, valid, out_memory = encoder_proposals(encoded)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_logits = self.class_embed[-1](out_memory)
        enc_boxes_unact = self.bbox_embed[-1](out_memory) + proposals_unact
        # "first": class-agnostic proposals are ranked by logit 0 (Deformable-DETR, H-DETR)
        scores = enc_logits.max(-1).values if self.proposal_score == "max" else enc_logits[..., 0]
        if self.proposals_valid_only:
            scores = scores.masked_fill(~valid, float("-inf"))
        topk, padding = _topk_padded(scores, num_select)
        proposals = EncoderProposals(enc_logits, enc_boxes_unact.sigmoid(), topk, padding)
        return proposals, gather_tokens(enc_boxes_unact, topk).detach()

    def _matching_queries(self, encoded: EncoderOutput, num_matching: int) -> DecoderQueries:
        """Content, reference, static position and encoder outputs of the matching queries."""
        n = encoded.memory.shape[0]
        if not self.two_stage:
            pos, content = self.query_embed.weight[:num_matching].split(self.d_model, dim=1)
            pos, content = pos[None].expand(n, -1, -1), content[None].expand(n, -1, -1)
            return DecoderQueries(content, self.reference_points(pos).sigmoid(), {}, query_pos=pos)
        proposals, boxes_unact = self._select_proposals(encoded, num_matching)
        reference = boxes_unact.sigmoid()
        query_pos = content = None
        if self.query_pos_mode == "static":
            embed = self.pos_trans_norm(self.pos_trans(sine_embedding(reference, self.d_model // 2, exchange_xy=False)))
            query_pos, content = embed.split(self.d_model, dim=-1)
        if hasattr(self, "tgt_embed"):
            content = self.tgt_embed.weight[:num_matching][None].expand(n, -1, -1)
        return DecoderQueries(content, reference, {}, query_pos=query_pos, padding=proposals.padding,
                              proposals=proposals)
