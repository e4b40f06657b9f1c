"""DINO contrastive denoising (CDN) queries built from the ground truth.

Each group holds a positive and a negative noised copy of every GT box of the image
(slots ``[0, M)`` positives, ``[M, 2M)`` negatives, M = most GTs in the batch; unused
slots are zero and act as background). Positives are moved by less than
``box_noise * half size`` per edge and must reconstruct their GT; negatives are moved by
between 1x and 2x that and must predict "no object". Labels are flipped to a random
class with probability ``label_noise / 2``. Group count, layout and noise follow the
official DINO (``prepare_for_cdn``); the noise is drawn by :meth:`ContrastiveDenoising.noise`,
which a test may replace to feed given groups.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["DenoisingQueries", "ContrastiveDenoising"]


@dataclass
class DenoisingQueries:
    """Denoising queries prepended to the decoder queries."""

    content: torch.Tensor  # [N, G * 2M, C] label embeddings
    boxes_unact: torch.Tensor  # [N, G * 2M, 4] inverse-sigmoid noised boxes
    num_groups: int  # G
    group_size: int  # 2M
    indices: List  # per image (query_idx, target_idx) of the positive queries

    @property
    def num_queries(self) -> int:
        return self.num_groups * self.group_size


class ContrastiveDenoising(nn.Module):
    """Builds :class:`DenoisingQueries`; owns the label embedding (``label_enc``).

    Args:
        num_dn: DINO's ``dn_number`` (100): 2 * num_dn // (2 * M) groups when 2 * num_dn >= 100,
            else 2 * num_dn groups (the official rule), at least one.
        inverse_sigmoid_eps: clamp of the noised boxes' logit (DINO: 1e-3).
    """

    def __init__(self, num_classes: int, embed_dim: int, num_dn: int = 100, label_noise: float = 0.5,
                 box_noise: float = 0.4, inverse_sigmoid_eps: float = 1e-3):
        super().__init__()
        self.num_classes = num_classes
        self.num_dn = num_dn
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.eps = inverse_sigmoid_eps
        self.label_enc = nn.Embedding(num_classes, embed_dim)

    def num_groups(self, max_gt: int) -> int:
        """Denoising groups of a batch whose largest image has ``max_gt`` objects (official DINO)."""
        doubled = 2 * self.num_dn
        return max(doubled // (2 * max_gt) if doubled >= 100 else doubled, 1)

    def forward(self, targets: Sequence[Dict[str, torch.Tensor]]) -> Optional[DenoisingQueries]:
        """None when no image has a GT (nothing to denoise)."""
        counts = [len(t["labels"]) for t in targets]
        max_gt = max(counts) if counts else 0
        if max_gt == 0 or self.num_dn <= 0:
            return None
        groups, size = self.num_groups(max_gt), 2 * max_gt
        labels, boxes = self.noise(targets, groups, max_gt)
        filled = labels >= 0
        indices = []
        for n in counts:
            slots = (torch.arange(groups)[:, None] * size + torch.arange(n)[None]).flatten()
            indices.append((slots, torch.arange(n).repeat(groups)))
        content = self.label_enc(labels.clamp(min=0)) * filled[..., None]
        boxes_unact = torch.where(filled[..., None], inverse_sigmoid(boxes, self.eps), torch.zeros_like(boxes))
        return DenoisingQueries(content, boxes_unact, groups, size, indices)

    def noise(self, targets: Sequence[Dict[str, torch.Tensor]], groups: int, max_gt: int):
        """The noised groups: labels ``[N, G * 2M]`` (-1 for an empty slot) and boxes
        ``[N, G * 2M, 4]`` (cx, cy, w, h), group g's positives at slots ``g * 2M + j``, its
        negatives at ``g * 2M + M + j``."""
        size = 2 * max_gt
        device = self.label_enc.weight.device
        dtype = next((t["boxes"].dtype for t in targets if t["boxes"].is_floating_point()), torch.float32)
        labels = torch.full((len(targets), groups * size), -1, dtype=torch.int64, device=device)
        boxes = torch.zeros(len(targets), groups * size, 4, dtype=dtype, device=device)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            slots = (torch.arange(groups, device=device)[:, None] * size + torch.arange(n, device=device)[None]).flatten()
            gt_labels = t["labels"].to(device).repeat(groups)
            gt_boxes = t["boxes"].to(device, dtype).repeat(groups, 1)
            labels[i, slots] = self._noisy_labels(gt_labels)
            labels[i, slots + max_gt] = self._noisy_labels(gt_labels)
            boxes[i, slots] = self._noisy_boxes(gt_boxes, negative=False)
            boxes[i, slots + max_gt] = self._noisy_boxes(gt_boxes, negative=True)
        return labels, boxes

    def _noisy_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.label_noise <= 0:
            return labels
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise * 0.5
        return torch.where(flip, torch.randint_like(labels, self.num_classes), labels)

    def _noisy_boxes(self, boxes: torch.Tensor, negative: bool) -> torch.Tensor:
        """Move each edge of (cx, cy, w, h) boxes by sign * u * half-size * box_noise,
        u in [0, 1) for positives and [1, 2) for negatives; clamp to the image."""
        if self.box_noise <= 0:
            return boxes
        half = boxes[:, 2:].repeat(1, 2) / 2
        magnitude = torch.rand_like(boxes) + float(negative)
        sign = torch.randint_like(boxes, 2) * 2.0 - 1.0
        xyxy = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half * self.box_noise
        return box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0))
