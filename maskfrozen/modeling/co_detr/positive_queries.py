"""Co-DETR's customised positive queries: each auxiliary head's positive boxes become one
extra query group that runs through the detector's own decoder (shared weights; all groups
in one pass, kept apart by a block-diagonal self-attention mask) and is
supervised with the head's assignment (a fixed-assignment entry of the shared criterion,
like DINO's denoising set; no Hungarian matching).

Query of a positive box b (normalised cx, cy, w, h) of head i:
- content ``LN(Linear_{2d->d}(PE(b')))`` with ``b' = sigmoid(inverse_sigmoid(b))`` (b clamped to
  [0, 1], eps 1e-5: the official ``get_proposal_pos_embed`` of the box logits) (+ ``LN(Linear_{d->d}(f))`` of its feature f when
  ``with_features``, Co-Deformable-DETR), the position then recomputed by DINO's decoder
  from the reference box (``query_pos="dynamic"``, Co-DINO);
- for a decoder with static query positions (Deformable-DETR / H-DETR),
  ``LN(Linear_{2d->2d}(PE(b')))`` split into (position, content), plus a learned per-head
  position embedding (the public code's ``head_pos_embed``, there a scalar by a documented
  bug, here a d-vector initialised at 0).
PE is the sine embedding of (x, y, w, h) with d/2 frequencies per coordinate.

Batching (official, ``mmdet``'s ``get_aux_targets``): each image gets ``P = max(9,
min(max_positives, the batch's largest positive count))`` slots: its positives (a random
subset beyond P), then random negatives of the same head (background anchors / sampled
proposals) up to P. A negative slot counts as background in the class loss and has no box
loss; every slot sees every other. Boxes are the head's anchors / proposals divided by the
unpadded image size (not clipped). The group's loss normaliser is its number of positives.

Ours (``MODEL.CO_DETR.PAD_WITH_NEGATIVES False``, the paper's description): no minimum of 9
(``MIN_POSITIVE_QUERIES``), short groups padded with masked slots: padded slots are masked as
attention keys (no positive query sees them) and their class logits are set to -1e4, so they
add exactly 0 to every loss. A group without positives in an image keeps its padded slots
visible to each other there, so their attention stays finite.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from maskfrozen.layers.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid
from maskfrozen.layers.position_encoding import sine_embedding
from maskfrozen.modeling.criterion import QuerySet
from maskfrozen.modeling.detr.transformer import DecoderQueries

from .atss import AuxPositives

__all__ = ["PositiveQueryEmbedding", "PositiveQueries", "batch_positives", "positive_query_sets"]

PADDED_LOGIT = -1e4  # sigmoid == 0 exactly: a padded slot adds 0 to the focal loss and gets no gradient


class PositiveQueryEmbedding(nn.Module):
    """Box (+ feature) -> (content, static position or None) of one head's queries."""

    def __init__(self, d_model: int, static_position: bool, with_features: bool):
        super().__init__()
        out = 2 * d_model if static_position else d_model
        self.d_model, self.static_position, self.with_features = d_model, static_position, with_features
        self.pos_proj = nn.Linear(2 * d_model, out)
        self.pos_norm = nn.LayerNorm(out)
        if with_features:
            self.feat_proj = nn.Linear(d_model, d_model)
            self.feat_norm = nn.LayerNorm(d_model)
        if static_position:
            self.head_embed = nn.Parameter(torch.zeros(d_model))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, boxes: torch.Tensor, features: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``boxes [N, P, 4]`` normalised cxcywh, ``features [N, P, d]`` -> content, position."""
        # the official embeds sigmoid(inverse_sigmoid(b)): b clamped to [0, 1] with eps 1e-5 (the
        # unclipped anchors of the coarse levels reach past 1)
        unit = inverse_sigmoid(boxes, eps=1e-5).sigmoid()
        embed = self.pos_norm(self.pos_proj(sine_embedding(unit, self.d_model // 2, exchange_xy=False)))
        position = None
        if self.static_position:
            position, embed = embed.split(self.d_model, dim=-1)
            position = position + self.head_embed
        if self.with_features:
            embed = embed + self.feat_norm(self.feat_proj(features))
        return embed, position


class PositiveQueries:
    """One head's positive queries of a batch (P = largest count in the batch, >= 1)."""

    def __init__(self, boxes, features, padded, indices, num_positives):
        self.boxes: torch.Tensor = boxes  # [N, P, 4] normalised cxcywh (padded slots: a dummy box)
        self.features: torch.Tensor = features  # [N, P, C]
        self.padded: torch.Tensor = padded  # [N, P] bool, True = no positive in this slot
        self.indices: List[Tuple[torch.Tensor, torch.Tensor]] = indices  # per image (slot, GT index)
        self.num_positives: int = num_positives


def _image_slots(p: AuxPositives, num: int, pad_with_negatives: bool, device) -> Tuple[torch.Tensor, ...]:
    """One image's ``num`` slots: its positives (a random subset beyond ``num``), then, with
    ``pad_with_negatives``, random negatives of the head (official). Returns boxes, features,
    the positive count and the positive's GT indices."""
    keep = torch.randperm(len(p.gt_index), device=device)[:num] if len(p.gt_index) > num else slice(None)
    boxes, features, gt_index = p.boxes[keep], p.features[keep], p.gt_index[keep]
    count = len(gt_index)
    if pad_with_negatives and count < num and p.negative_boxes is not None:
        negatives = torch.randperm(len(p.negative_boxes), device=device)[:num - count]
        boxes = torch.cat([boxes, p.negative_boxes[negatives].to(boxes.dtype)])
        features = torch.cat([features, p.negative_features[negatives].to(features.dtype)])
    return boxes, features, count, gt_index


def batch_positives(positives: Sequence[AuxPositives], image_sizes, max_positives: int, channels: int,
                    min_queries: int = 9, pad_with_negatives: bool = True,
                    clip_boxes: bool = False) -> PositiveQueries:
    """One head's group: ``P = max(min_queries, min(max_positives, largest positive count))``
    slots per image, positives first (boxes / the unpadded image size, cxcywh; ``clip_boxes``:
    clipped to the image first, ours), then random negatives of the head (``pad_with_negatives``,
    official: background in the class loss) or masked padding (ours, see module doc)."""
    device = positives[0].boxes.device if positives else torch.device("cpu")
    num = max(max([min(len(p.gt_index), max_positives) for p in positives] + [0]), min_queries, 1)
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device).repeat(len(positives), num, 1)
    features = torch.zeros(len(positives), num, channels, device=device)
    padded = torch.ones(len(positives), num, dtype=torch.bool, device=device)
    indices, counts = [], []
    for b, (p, (h, w)) in enumerate(zip(positives, image_sizes)):
        image_boxes, image_features, count, gt_index = _image_slots(p, num, pad_with_negatives, device)
        n = len(image_boxes)
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=device)
        normalised = image_boxes.to(boxes.dtype) / scale
        boxes[b, :n] = box_xyxy_to_cxcywh(normalised.clamp(0.0, 1.0) if clip_boxes else normalised)
        features[b, :n] = image_features.to(features.dtype)
        padded[b, :n] = False
        indices.append((torch.arange(count), gt_index.cpu()))
        counts.append(count)
    return PositiveQueries(boxes, features, padded, indices, sum(counts))


def positive_query_sets(detector, encoded, groups: Sequence[PositiveQueries],
                        embeddings: Sequence[PositiveQueryEmbedding], weight: float, num_gt: int) -> List[QuerySet]:
    """Run every head's group through ONE ``detector.transformer.decode`` pass, the groups
    kept apart by a block-diagonal self-attention mask (the same computation as one pass
    per group, as the public code runs them, with one pass of overhead), and describe group
    i as the criterion entry ``_pos{i}`` (all decoder layers, fixed indices)."""
    contents, positions, sizes, key_padding = [], [], [], []
    for group, embedding in zip(groups, embeddings):
        content, position = embedding(group.boxes, group.features)
        contents.append(content)
        positions.append(position)
        sizes.append(group.boxes.shape[1])
        key_padding.append(group.padded & ~group.padded.all(1, keepdim=True))
    slices, start = [], 0
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    mask = None
    if len(groups) > 1:
        mask = torch.ones(start, start, dtype=torch.bool, device=contents[0].device)
        for sl in slices:
            mask[sl, sl] = False
    padding = torch.cat(key_padding, 1)
    queries = DecoderQueries(
        torch.cat(contents, 1), torch.cat([g.boxes for g in groups], 1),
        {f"_pos{i}": sl for i, sl in enumerate(slices)},
        query_pos=None if positions[0] is None else torch.cat(positions, 1), self_attn_mask=mask,
        padding=padding if bool(padding.any()) else None)
    out = detector.transformer.decode(encoded, queries)
    sets = []
    for i, (group, sl) in enumerate(zip(groups, slices)):
        logits = out.pred_logits[:, :, sl].masked_fill(group.padded[None, :, :, None], PADDED_LOGIT)
        layers = [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits, out.pred_boxes[:, :, sl])]
        normalizer = max(group.num_positives, 1) / max(num_gt, 1)
        sets.append(QuerySet({**layers[-1], "aux_outputs": layers[:-1]}, f"_pos{i}", indices=group.indices,
                             weight=weight, normalizer=normalizer))
    return sets
