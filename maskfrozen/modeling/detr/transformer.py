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
each layer recomputes it as MLP(sine(reference box)).

Choices that differ from a public repo (all for padding invariance or cost):
- the encoder-proposal loss covers the top-k selected proposals (DINO) in every
  variant; Deformable-DETR / H-DETR supervise all tokens;
- DINO's dynamic query position embeds the image-normalised reference box, not the
  box scaled by level 0's valid ratio, so padding does not change it;
- padded or out-of-range tokens are never selected as proposals (score -inf).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers.box_ops import inverse_sigmoid
from maskfrozen.layers.ms_deform_attn import MSDeformAttn
from maskfrozen.layers.position_encoding import sine_embedding
from maskfrozen.layers.transformer_blocks import FFN, MLP

from .denoising import DenoisingQueries
from .query_groups import query_self_attention_mask, query_slices

__all__ = ["DeformableTransformer", "DeformableTransformerOutput"]


@dataclass
class DeformableTransformerOutput:
    """Everything a head may attach to. S = sum_l H_l * W_l, Q = all decoder queries
    (denoising + one-to-one + one-to-many, see ``query_groups``), D = decoder layers."""

    memory: torch.Tensor  # [N, S, C] encoder output
    spatial_shapes: torch.Tensor  # [L, 2] int64 (H, W)
    level_start_index: torch.Tensor  # [L] int64
    valid_ratios: torch.Tensor  # [N, L, 2] valid (w, h) fraction of each level
    padding_mask: torch.Tensor  # [N, S] bool, True = padding
    hidden_states: torch.Tensor  # [D, N, Q, C] decoder outputs (after the final norm)
    references: List[torch.Tensor]  # D x [N, Q, 2 or 4] input reference of each layer (sigmoid space)
    pred_logits: torch.Tensor  # [D, N, Q, K]
    pred_boxes: torch.Tensor  # [D, N, Q, 4] normalised (cx, cy, w, h)
    query_groups: Dict[str, slice] = field(default_factory=dict)  # "dn", "one2one", "one2many"
    enc_logits: Optional[torch.Tensor] = None  # [N, Q_sel, K] selected encoder proposals
    enc_boxes: Optional[torch.Tensor] = None  # [N, Q_sel, 4]

    def level_maps(self) -> List[torch.Tensor]:
        """The encoder memory as per-level maps ``[N, C, H_l, W_l]``."""
        n, _, c = self.memory.shape
        sizes = [int(h) * int(w) for h, w in self.spatial_shapes.tolist()]
        chunks = self.memory.split(sizes, dim=1)
        return [x.transpose(1, 2).reshape(n, c, int(h), int(w)) for x, (h, w) in zip(chunks, self.spatial_shapes.tolist())]

    def level_padding_masks(self) -> List[torch.Tensor]:
        """Per-level ``[N, H_l, W_l]`` padding masks."""
        n = self.padding_mask.shape[0]
        sizes = [int(h) * int(w) for h, w in self.spatial_shapes.tolist()]
        return [m.view(n, int(h), int(w)) for m, (h, w) in zip(self.padding_mask.split(sizes, 1), self.spatial_shapes.tolist())]

    @property
    def final_queries(self) -> torch.Tensor:
        """``[N, Q1, C]`` last-layer embeddings of the one-to-one queries."""
        return self.hidden_states[-1][:, self.query_groups["one2one"]]

    @property
    def final_scores(self) -> torch.Tensor:
        """``[N, Q1, K]`` last-layer sigmoid class scores of the one-to-one queries."""
        return self.pred_logits[-1][:, self.query_groups["one2one"]].sigmoid()

    @property
    def final_boxes(self) -> torch.Tensor:
        """``[N, Q1, 4]`` last-layer boxes of the one-to-one queries."""
        return self.pred_boxes[-1][:, self.query_groups["one2one"]]


# ----------------------------------------------------------------------------- layers
class DeformableEncoderLayer(nn.Module):
    """src = LN(src + MSDeformAttn(src + pos)); src = LN(FFN(src))."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_levels, num_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, nhead, num_levels, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(self.ffn(src))


class DeformableDecoderLayer(nn.Module):
    """tgt = LN(tgt + SelfAttn(tgt + pos)); tgt = LN(tgt + MSDeformAttn(tgt + pos, memory));
    tgt = LN(FFN(tgt))."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, num_levels, num_points):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, nhead, num_levels, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout, activation)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None):
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        cross = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(self.ffn(tgt))


# ----------------------------------------------------------------------------- helpers
def _valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` padding mask -> ``[N, 2]`` valid (w, h) fractions."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)


def _pixel_grid(h: int, w: int, device) -> torch.Tensor:
    """``[h * w, 2]`` (x, y) pixel centres in pixels, row-major."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device) + 0.5,
        torch.arange(w, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def _valid_sizes(mask_flat: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, lvl: int):
    """``[N, 2]`` valid (w, h) in pixels of level ``lvl``, from the flattened mask."""
    h, w = (int(x) for x in spatial_shapes[lvl])
    start = int(level_start_index[lvl])
    m = mask_flat[:, start : start + h * w].view(-1, h, w)
    return torch.stack([(~m[:, 0, :]).sum(1), (~m[:, :, 0]).sum(1)], -1).float()


def encoder_reference_points(mask_flat, spatial_shapes, level_start_index, valid_ratios) -> torch.Tensor:
    """``[N, S, L, 2]`` the pixel centre of every token, normalised by the valid size of
    its level and expressed in every level's padded coordinates (Deformable-DETR)."""
    refs = []
    for lvl in range(len(spatial_shapes)):
        h, w = (int(x) for x in spatial_shapes[lvl])
        valid = _valid_sizes(mask_flat, spatial_shapes, level_start_index, lvl)
        refs.append(_pixel_grid(h, w, mask_flat.device)[None] / valid[:, None, :])
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def encoder_proposals(memory, mask_flat, spatial_shapes, level_start_index):
    """Two-stage proposals: a box of size 0.05 * 2^l centred on every valid token.

    Returns:
        proposals_unact ``[N, S, 4]`` (inverse sigmoid; +inf where invalid),
        valid ``[N, S]`` bool (not padding and well inside (0.01, 0.99)),
        memory with invalid tokens zeroed.
    """
    props = []
    for lvl in range(len(spatial_shapes)):
        h, w = (int(x) for x in spatial_shapes[lvl])
        valid = _valid_sizes(mask_flat, spatial_shapes, level_start_index, lvl)
        centres = _pixel_grid(h, w, memory.device)[None] / valid[:, None, :]
        sizes = torch.full_like(centres, 0.05 * (2.0**lvl))
        props.append(torch.cat([centres, sizes], -1))
    proposals = torch.cat(props, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~mask_flat
    proposals_unact = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return proposals_unact, valid, memory.masked_fill(~valid[..., None], 0.0)


def _apply_box_delta(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sigmoid(delta + logit(reference)); a 2-D reference only shifts the centre."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def _scale_reference(reference: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """``[N, Q, 2|4]`` image-normalised reference -> ``[N, Q, L, 2|4]`` per padded level."""
    ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
    return reference[:, :, None] * ratios[:, None]


# ----------------------------------------------------------------------------- modules
class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask):
        reference_points = encoder_reference_points(padding_mask, spatial_shapes, level_start_index, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Decoder layers + per-layer predictions (iterative refinement, look-forward-twice)."""

    def __init__(self, num_layers: int, d_model: int, query_pos: str, final_norm: bool, box_refine: bool,
                 look_forward_twice: bool, **layer_kwargs):
        super().__init__()
        if query_pos not in ("static", "dynamic"):
            raise ValueError(f"DeformableDecoder: query_pos must be 'static' or 'dynamic', got {query_pos!r}")
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model=d_model, **layer_kwargs) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if query_pos == "dynamic" else None
        self.d_model = d_model
        self.box_refine = box_refine
        self.look_forward_twice = look_forward_twice

    def forward(self, tgt, reference, memory, memory_padding_mask, spatial_shapes, level_start_index, valid_ratios,
                query_pos, self_attn_mask, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList):
        """``reference`` ``[N, Q, 2|4]``: the initial references (two-stage proposals come
        detached; learned one-stage references keep their gradient). Heads: one per layer
        with box refinement, else ``[0]`` is shared. Returns hidden states, input
        references, logits and boxes, one entry per layer."""
        hidden, references, logits, boxes = [], [], [], []
        pred_reference = reference
        for lid, layer in enumerate(self.layers):
            scaled = _scale_reference(reference, valid_ratios)
            if self.ref_point_head is not None:
                # DINO embeds the reference scaled to level 0 (``scaled[:, :, 0]``); the
                # image-normalised reference is used here so padding does not change it
                query_pos = self.ref_point_head(sine_embedding(reference, self.d_model // 2))
            tgt = layer(tgt, query_pos, scaled, memory, spatial_shapes, level_start_index, memory_padding_mask,
                        self_attn_mask)
            hs = self.norm(tgt)
            head = lid if self.box_refine else 0
            box_head = bbox_embed[head]
            references.append(reference)
            boxes.append(_apply_box_delta(box_head(hs), pred_reference))
            logits.append(class_embed[head](hs))
            hidden.append(hs)
            if self.box_refine:
                # refine from the un-normed output (DINO); equal to the prediction when there
                # is no final norm and the prediction's reference is the detached one
                same_as_prediction = hs is tgt and not self.look_forward_twice
                refined = boxes[-1] if same_as_prediction else _apply_box_delta(box_head(tgt), reference)
                pred_reference = refined if self.look_forward_twice else refined.detach()
                reference = refined.detach()
        return torch.stack(hidden), references, torch.stack(logits), torch.stack(boxes)


class DeformableTransformer(nn.Module):
    """Encoder + query selection + decoder + prediction heads (see module doc).

    Args (beyond the usual sizes):
        num_queries / num_queries_one2many: one-to-one queries; H-DETR's extra
            one-to-many queries (training only).
        two_stage, box_refine, mixed_selection, query_pos, look_forward_twice,
            decoder_final_norm: the variant (see the table above).
        proposal_score: rank encoder proposals by their best class ("max", DINO) or by
            logit 0 ("first", class-agnostic proposals of Deformable-DETR / H-DETR).

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
        self.proposal_score = proposal_score
        layer_kwargs = dict(nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                            num_levels=num_feature_levels)
        self.encoder = DeformableEncoder(num_encoder_layers, d_model=d_model, num_points=enc_n_points, **layer_kwargs)
        self.decoder = DeformableDecoder(num_decoder_layers, d_model, query_pos, decoder_final_norm, box_refine,
                                         look_forward_twice, num_points=dec_n_points, **layer_kwargs)
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
        num_heads = (num_decoder_layers if box_refine else 1) + int(two_stage)
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

    # ------------------------------------------------------------------ pieces
    def _flatten(self, srcs, masks, pos_embeds):
        if len(srcs) != len(self.level_embeds):
            raise ValueError(f"DeformableTransformer: got {len(srcs)} feature levels, built for {len(self.level_embeds)}")
        shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.int64, device=srcs[0].device)
        start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embeds[l] for l, p in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([_valid_ratios(m) for m in masks], 1)
        return src, mask, pos, shapes, start, valid_ratios

    def _select_proposals(self, memory, mask, shapes, start, num_select):
        """Top-scoring encoder proposals: their heads' outputs (for the encoder loss) and
        the detached boxes that become the decoder's initial references."""
        proposals_unact, valid, out_memory = encoder_proposals(memory, mask, shapes, start)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_logits = self.class_embed[-1](out_memory)
        enc_boxes_unact = self.bbox_embed[-1](out_memory) + proposals_unact
        # "first": class-agnostic proposals are ranked by logit 0 (Deformable-DETR, H-DETR)
        scores = enc_logits.max(-1).values if self.proposal_score == "max" else enc_logits[..., 0]
        scores = scores.masked_fill(~valid, float("-inf"))
        topk = scores.topk(num_select, dim=1).indices
        gather = lambda x: torch.gather(x, 1, topk[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        boxes_unact = gather(enc_boxes_unact)
        return gather(enc_logits), boxes_unact.sigmoid(), boxes_unact.detach()

    def _initial_queries(self, memory, mask, shapes, start, num_matching):
        """(content ``[N, Q, C]``, reference ``[N, Q, 2|4]``, static query pos or None,
        encoder logits, encoder boxes) of the matching queries."""
        n = memory.shape[0]
        if not self.two_stage:
            pos, content = self.query_embed.weight[:num_matching].split(self.d_model, dim=1)
            pos, content = pos[None].expand(n, -1, -1), content[None].expand(n, -1, -1)
            return content, self.reference_points(pos).sigmoid(), pos, None, None
        enc_logits, enc_boxes, boxes_unact = self._select_proposals(memory, mask, shapes, start, num_matching)
        reference = boxes_unact.sigmoid()
        query_pos = content = None
        if self.query_pos_mode == "static":
            embed = self.pos_trans_norm(self.pos_trans(sine_embedding(reference, self.d_model // 2, exchange_xy=False)))
            query_pos, content = embed.split(self.d_model, dim=-1)
        if hasattr(self, "tgt_embed"):
            content = self.tgt_embed.weight[:num_matching][None].expand(n, -1, -1)
        return content, reference, query_pos, enc_logits, enc_boxes

    # ------------------------------------------------------------------ forward
    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                denoising: Optional[DenoisingQueries] = None) -> DeformableTransformerOutput:
        """Args:
            srcs: per level ``[N, C, H_l, W_l]``; masks: ``[N, H_l, W_l]`` bool (True = padding);
            pos_embeds: ``[N, C, H_l, W_l]``; denoising: DINO queries prepended (training).
        """
        src, mask, pos, shapes, start, valid_ratios = self._flatten(srcs, masks, pos_embeds)
        memory = self.encoder(src, pos, shapes, start, valid_ratios, mask)
        num_one2many = self.num_queries_one2many if self.training else 0
        content, reference, query_pos, enc_logits, enc_boxes = self._initial_queries(
            memory, mask, shapes, start, self.num_queries + num_one2many)
        num_groups = group_size = 0
        if denoising is not None:
            if self.query_pos_mode != "dynamic":
                raise ValueError("DeformableTransformer: denoising queries need query_pos='dynamic' (DINO)")
            content = torch.cat([denoising.content, content], 1)
            reference = torch.cat([denoising.boxes_unact.sigmoid(), reference], 1)
            num_groups, group_size = denoising.num_groups, denoising.group_size
        attn_mask = query_self_attention_mask(num_groups, group_size, self.num_queries, num_one2many, memory.device)
        hidden, references, logits, boxes = self.decoder(
            content, reference, memory, mask, shapes, start, valid_ratios, query_pos, attn_mask,
            self.class_embed, self.bbox_embed)
        return DeformableTransformerOutput(
            memory=memory, spatial_shapes=shapes, level_start_index=start, valid_ratios=valid_ratios,
            padding_mask=mask, hidden_states=hidden, references=references, pred_logits=logits, pred_boxes=boxes,
            query_groups=query_slices(num_groups * group_size, self.num_queries, num_one2many),
            enc_logits=enc_logits, enc_boxes=enc_boxes)
