"""Attention masks of the query-based mask decoders (Mask2Former, FastInst).

Convention of ``nn.MultiheadAttention``: True = the query may NOT attend to that position;
a row that would mask every position is cleared (the query attends everywhere). Shapes:
``[B * nhead, Q + extra, h * w]`` for ``B`` images, ``Q`` predicting queries and ``extra``
queries that predict nothing (FastInst's auxiliary queries: they always attend everywhere).
"""
from typing import Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

from maskfrozen.modeling.criterion.losses import Indices

__all__ = ["attention_mask_from_masks", "attention_mask_from_gt"]


def _finish(mask: torch.Tensor, nhead: int, extra_queries: int) -> torch.Tensor:
    """Clear all-masked rows, append ``extra_queries`` attend-everywhere rows, repeat per head."""
    mask[mask.all(-1)] = False
    if extra_queries:
        mask = F.pad(mask, (0, 0, 0, extra_queries), value=False)
    return mask.repeat_interleave(nhead, dim=0)


def attention_mask_from_masks(mask_logits: torch.Tensor, size: Tuple[int, int], nhead: int,
                              extra_queries: int = 0, dilation: int = 0) -> torch.Tensor:
    """Masked attention M(q, p) = [sigmoid(mask_q(p)) < 0.5] from ``[B, Q, h', w']`` mask
    logits resized (bilinear) to ``size`` (Mask2Former / FastInst). ``dilation`` d > 0 (not in
    the papers; 0 = theirs) also lets a query attend to the d cells around its mask (a
    (2d+1) x (2d+1) max filter of the allowed region), so that it sees its object's outline."""
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    allowed = resized.sigmoid() >= 0.5
    if dilation > 0:
        allowed = F.max_pool2d(allowed.to(resized.dtype), 2 * dilation + 1, stride=1, padding=dilation) > 0
    return _finish(~allowed.flatten(2), nhead, extra_queries)


def attention_mask_from_gt(indices: Indices, targets: Sequence[Mapping[str, torch.Tensor]], num_queries: int,
                           size: Tuple[int, int], nhead: int, extra_queries: int = 0) -> torch.Tensor:
    """FastInst's GT-mask-guided attention: a matched query may attend only inside its GT mask
    (resized to ``size`` by nearest neighbour); unmatched queries attend everywhere."""
    device = targets[0]["masks"].device if len(targets) else torch.device("cpu")
    mask = torch.zeros(len(targets), num_queries, size[0] * size[1], dtype=torch.bool, device=device)
    for b, ((query_idx, target_idx), target) in enumerate(zip(indices, targets)):
        if len(query_idx):
            gt = F.interpolate(target["masks"][target_idx.to(device)][None].float(), size=size, mode="nearest")[0]
            mask[b, query_idx.to(device)] = gt.flatten(1) < 0.5
    return _finish(mask, nhead, extra_queries)
