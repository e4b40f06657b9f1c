"""FastInst's instance-activation-guided queries (IA-guided queries).

An auxiliary classifier ``Conv1x1(ReLU(Conv3x3(E)))`` on the 1/16 pixel features E gives
per-pixel class probabilities p(i, k) (K classes + background). Each pixel keeps only its
arg-max foreground class k_i; a pixel is a candidate when p(i, k_i) is a local maximum of
channel k_i over its 8 neighbours. The N pixels with the highest p(i, k_i) + [candidate]
(candidates first) give the initial queries: their features E_i, position embeddings and
normalised (x, y) locations (for the location cost of the decoder's matching), as the official
code ``linspace(0, 1, n)`` per axis: the first and last cells sit on the map's outer edges
(``LOCATIONS_AT_CELL_CENTRES``, ours, off: the cells' centres (i + 0.5) / n).

Training of the classifier (:func:`proposal_loss`): Hungarian matching of the pixels to the
GT objects with a class cost and a location cost (the pixel must lie inside the GT mask
pooled to the 1/16 grid, read cell by cell as the official code does), then cross-entropy over
all pixels (matched: their GT class, others: background).
"""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers import gather_tokens
from maskfrozen.layers.deformable_encoder import pixel_centres
from maskfrozen.modeling.criterion import HungarianMatcher, class_loss_softmax

__all__ = ["Proposals", "InstanceActivationQueries", "local_maxima", "grid_locations", "proposal_loss"]


def local_maxima(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[B, C, h, w]`` non-negative scores -> bool map, True where a score is >= each of its 8
    neighbours in its channel (outside the map counts as 0) and >= ``eps``."""
    return (scores >= F.max_pool2d(scores, kernel_size=3, stride=1, padding=1)) & (scores >= eps)


def grid_locations(h: int, w: int, device: Optional[torch.device] = None, cell_centres: bool = False) -> torch.Tensor:
    """``[h * w, 2]`` float32 normalised (x, y) of the cells of an h x w map, row-major: the
    official ``linspace(0, 1, n)`` per axis (first and last cells on the map's outer edges), or
    with ``cell_centres`` the cells' centres ``(i + 0.5) / n``."""
    if cell_centres:
        return pixel_centres(h, w, device) / torch.tensor([w, h], dtype=torch.float32, device=device)
    if torch.compiler.is_exporting():  # linspace would fix h and w in the exported graph
        ys, xs = torch.meshgrid(_unit_steps(h, device), _unit_steps(w, device), indexing="ij")
    else:
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device),
                                indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def _unit_steps(n, device: Optional[torch.device] = None) -> torch.Tensor:
    """``linspace(0, 1, n)`` (within 1 ulp) from ``arange``: while torch.export traces, where
    ``linspace`` would fix ``n`` (the map size) in the exported graph. Inference does not read
    the locations (only the training matcher does)."""
    i = torch.arange(n, dtype=torch.float32, device=device)
    step = torch.ones((), device=device) / (n - 1)
    return torch.where(i < n // 2, i * step, 1 - step * (n - 1 - i))


@dataclass
class Proposals:
    """The selected queries of a batch and the classifier's logits."""

    features: torch.Tensor  # [B, N, C] initial query content
    pos: torch.Tensor  # [B, N, C] their position embeddings
    locations: torch.Tensor  # [B, N, 2] normalised (x, y) of their pixels
    logits: torch.Tensor  # [B, K+1, h, w] the auxiliary classifier's logits
    index: torch.Tensor  # [B, N] the selected pixels' indices in the flattened map, best first


class InstanceActivationQueries(nn.Module):
    """The auxiliary classifier and the top-N pixel selection (see module doc)."""

    def __init__(self, channels: int, num_queries: int, num_classes: int, cell_centre_locations: bool = False):
        super().__init__()
        self.num_queries, self.num_classes = num_queries, num_classes
        self.cell_centre_locations = cell_centre_locations
        self.conv_proposal_cls_logits = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, num_classes + 1, 1))

    @torch.no_grad()
    def activation_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, K+1, h, w]`` logits -> ``[B, h*w]`` score p(i, k_i) + [local maximum]."""
        foreground = logits.softmax(1)[:, :-1]
        best = F.one_hot(foreground.argmax(1), self.num_classes).permute(0, 3, 1, 2).to(foreground.dtype)
        kept = foreground * best
        return (kept + local_maxima(kept).to(kept.dtype)).amax(1).flatten(1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> Proposals:
        """``x [B, C, h, w]`` 1/16 features, ``pos [C, h, w]`` their position embeddings."""
        h, w = x.shape[-2:]
        if h * w < self.num_queries:
            raise ValueError(f"FastInst: the 1/16 feature map ({h}x{w} for this input) has fewer pixels than "
                             f"NUM_OBJECT_QUERIES={self.num_queries}: use larger images or fewer queries")
        logits = self.conv_proposal_cls_logits(x)
        index = self.activation_scores(logits).topk(self.num_queries, dim=1).indices  # [B, N]
        tokens = x.flatten(2).transpose(1, 2)
        pos_tokens = pos.flatten(1).t()[None].expand(x.shape[0], -1, -1)
        locations = grid_locations(h, w, x.device, self.cell_centre_locations)[None].expand(x.shape[0], -1, -1)
        return Proposals(gather_tokens(tokens, index), gather_tokens(pos_tokens, index),
                         gather_tokens(locations, index), logits, index)


def _pooled_targets(targets: Sequence[Mapping[str, torch.Tensor]], size) -> List[Dict[str, torch.Tensor]]:
    """Targets with each mask max-pooled to ``size`` (a cell is inside when any pixel is)."""
    pooled = []
    for t in targets:
        masks = t["masks"]
        small = (F.adaptive_max_pool2d(masks[None].float(), size)[0] if len(masks)
                 else masks.new_zeros(0, *size, dtype=torch.float32))
        pooled.append({"labels": t["labels"], "masks": small})
    return pooled


def proposal_loss(logits: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
                  matcher: HungarianMatcher) -> torch.Tensor:
    """Cross-entropy of the auxiliary classifier over all pixels after matching pixels to GTs
    with ``matcher`` (costs "class" + "location" on the pooled masks; each pixel's location is its
    cell's centre, where the location cost reads exactly that cell of the pooled mask)."""
    size = tuple(logits.shape[-2:])
    pixels = logits.flatten(2).transpose(1, 2)  # [B, h*w, K+1]
    locations = grid_locations(*size, logits.device, cell_centres=True)[None].expand(len(logits), -1, -1)
    pooled = _pooled_targets(targets, size)
    indices = matcher({"pred_logits": pixels, "query_locations": locations}, pooled)
    return class_loss_softmax(pixels, pooled, indices, 1.0, eos_coef=1.0)  # plain mean over pixels
