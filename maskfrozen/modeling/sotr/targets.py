"""SOTR training targets and losses (SOLO's, as the official code computes them).

Each object goes to every level whose scale range holds ``sqrt(box area)``; on the level's
``N x N`` grid over the padded image its positive cells are those within ``sigma * half box``
of its centre of mass, limited to the 3x3 cells around the centre cell (float32 arithmetic in
the official order, centres in pixel indices). Each (cell, object) pair is one mask target: a
cell shared by two objects keeps a target per object (its class is the later object's). The
class loss is a focal loss over all cells ``/ (positive cells + 1)``; the mask loss a dice loss
of each pair's dynamic mask against the object's mask at 1/4 scale, mean over the pairs.

Options (``MODEL.SOTR``, official first): ``TARGET_CENTRES`` ``"pixel_index"`` |
``"pixel_centre"`` (+0.5); ``GT_MASK_RESIZE`` ``"unpadded"`` (OpenCV bilinear resize of the
unpadded mask to ``round(size / 4)``, pasted top-left) | ``"padded"`` (pad, then bilinear to
exactly 1/4, >= 0.5); ``DICE`` ``"squared"`` | ``"smoothed"``.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from maskfrozen.modeling.criterion.mask_losses import dice_loss, squared_dice_loss

from .head import dynamic_conv

__all__ = ["LevelTargets", "solo_level_targets", "centres_of_mass", "centre_regions", "gt_mask_targets",
           "SOTRLoss", "TARGET_CENTRES", "GT_MASK_RESIZES", "DICE_LOSSES"]

TARGET_CENTRES = ("pixel_index", "pixel_centre")
GT_MASK_RESIZES = ("unpadded", "padded")
DICE_LOSSES = {"squared": squared_dice_loss, "smoothed": dice_loss}
_CV2_MAX_CHANNELS = 512


@dataclass
class LevelTargets:
    """Targets of one image at one level: ``labels [N, N]`` (``K`` = background) and the
    (cell, object) pairs ``cells [P]`` (flat ``y * N + x``) / ``gt_index [P]``, objects in
    order, each object's cells row by row."""

    labels: torch.Tensor
    cells: torch.Tensor
    gt_index: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        """``[N * N]`` bool: the cells with at least one object."""
        out = torch.zeros(self.labels.numel(), dtype=torch.bool, device=self.labels.device)
        out[self.cells] = True
        return out


def centres_of_mass(masks: torch.Tensor, offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[T, H, W]`` bool -> float32 ``(cy, cx)`` ``[T]`` in pixel indices (+ ``offset``), summed
    in the official order (an empty mask gives 0)."""
    _, h, w = masks.shape
    ys = torch.arange(h, dtype=torch.float32, device=masks.device) + offset
    xs = torch.arange(w, dtype=torch.float32, device=masks.device) + offset
    area = masks.sum(dim=-1).sum(dim=-1).clamp(min=1e-6)
    return (masks * ys[:, None]).sum(dim=-1).sum(dim=-1) / area, (masks * xs).sum(dim=-1).sum(dim=-1) / area


def _cell(v: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """Grid index of pixel coordinate ``v`` on ``n`` cells over ``size`` px (float32 floor division)."""
    return torch.div(v / size, 1.0 / n, rounding_mode="floor").long()


def centre_regions(cy: torch.Tensor, cx: torch.Tensor, half_h: torch.Tensor, half_w: torch.Tensor,
                   padded_size: Tuple[int, int], n: int) -> torch.Tensor:
    """``[T, 4]`` inclusive ``(top, bottom, left, right)`` cells of each object on an ``n x n``
    grid over ``padded_size``: the centre region ``(cy, cx) +- (half_h, half_w)`` clipped to the
    3x3 cells around the centre cell."""
    h, w = padded_size
    ch, cw = _cell(cy, h, n), _cell(cx, w, n)
    top = torch.maximum(_cell(cy - half_h, h, n).clamp(min=0), ch - 1)
    bottom = torch.minimum(_cell(cy + half_h, h, n).clamp(max=n - 1), ch + 1)
    left = torch.maximum(_cell(cx - half_w, w, n).clamp(min=0), cw - 1)
    right = torch.minimum(_cell(cx + half_w, w, n).clamp(max=n - 1), cw + 1)
    return torch.stack([top, bottom, left, right], 1)


def solo_level_targets(boxes: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, padded_size: Tuple[int, int],
                       num_grids: Sequence[int], scale_ranges: Sequence[Sequence[float]], sigma: float,
                       num_classes: int, centre_offset: float = 0.0) -> List[LevelTargets]:
    """Per-level targets of one image (module doc). ``boxes [T, 4]`` XYXY pixels, ``masks [T, h, w]``
    bool over the image, ``labels [T]``; the grids cover ``padded_size``. Empty masks are skipped."""
    scales = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    half_w = 0.5 * (boxes[:, 2] - boxes[:, 0]) * sigma
    half_h = 0.5 * (boxes[:, 3] - boxes[:, 1]) * sigma
    cy, cx = centres_of_mass(masks, centre_offset)
    nonempty = masks.sum(dim=-1).sum(dim=-1) > 0
    device = labels.device
    out = []
    for n, (lo, hi) in zip(num_grids, scale_ranges):
        grid = torch.full((n, n), num_classes, dtype=torch.long, device=device)
        hit = ((scales >= lo) & (scales <= hi) & nonempty).nonzero().flatten()
        regions = centre_regions(cy[hit], cx[hit], half_h[hit], half_w[hit], padded_size, n).tolist()
        cells, gt_index = [], []
        for t, (top, bottom, left, right) in zip(hit.tolist(), regions):
            grid[top:bottom + 1, left:right + 1] = labels[t]
            region = [y * n + x for y in range(top, bottom + 1) for x in range(left, right + 1)]
            cells += region
            gt_index += [t] * len(region)
        out.append(LevelTargets(grid, torch.tensor(cells, dtype=torch.long, device=device),
                                torch.tensor(gt_index, dtype=torch.long, device=device)))
    return out


def _opencv_quarter(masks: torch.Tensor) -> torch.Tensor:
    """``[T, h, w]`` bool -> ``[T, round(h / 4), round(w / 4)]`` uint8 by OpenCV's bilinear resize
    of the 0/1 masks (the official ``imrescale(mask, 1 / 4)``; channels are independent)."""
    _, h, w = masks.shape
    size = (int(w * 0.25 + 0.5), int(h * 0.25 + 0.5))
    planes = masks.permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    parts = []
    for start in range(0, planes.shape[2], _CV2_MAX_CHANNELS):
        small = cv2.resize(np.ascontiguousarray(planes[:, :, start:start + _CV2_MAX_CHANNELS]), size,
                           interpolation=cv2.INTER_LINEAR)
        parts.append(small.reshape(size[1], size[0], -1))
    return torch.from_numpy(np.concatenate(parts, axis=2)).permute(2, 0, 1).to(masks.device)


def gt_mask_targets(masks: torch.Tensor, feature_size: Tuple[int, int], mode: str = "unpadded") -> torch.Tensor:
    """``[T, h, w]`` bool masks over the image -> ``[T, *feature_size]`` float {0, 1} at the
    mask-feature scale: ``"unpadded"`` (official) or ``"padded"`` (module doc)."""
    fh, fw = feature_size
    out = masks.new_zeros((len(masks), fh, fw), dtype=torch.float32)
    if len(masks) == 0:
        return out
    if mode == "unpadded":
        small = _opencv_quarter(masks)
        out[:, :small.shape[1], :small.shape[2]] = small.float()
        return out
    padded = F.pad(masks, (0, 4 * fw - masks.shape[-1], 0, 4 * fh - masks.shape[-2]))
    small = F.interpolate(padded[:, None].float(), size=(fh, fw), mode="bilinear", align_corners=False)[:, 0]
    return (small >= 0.5).float()


class SOTRLoss:
    """``L = lambda_cls focal(classes) + lambda_mask dice(masks)`` (weights 1 and 3; module doc)."""

    def __init__(self, num_classes: int, num_grids: Sequence[int], scale_ranges: Sequence[Sequence[float]],
                 sigma: float = 0.2, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 focal_weight: float = 1.0, dice_weight: float = 3.0, target_centres: str = "pixel_index",
                 gt_mask_resize: str = "unpadded", dice: str = "squared"):
        for key, value, choices in (("TARGET_CENTRES", target_centres, TARGET_CENTRES),
                                    ("GT_MASK_RESIZE", gt_mask_resize, GT_MASK_RESIZES),
                                    ("DICE", dice, tuple(DICE_LOSSES))):
            if value not in choices:
                raise ValueError(f"MODEL.SOTR.{key} must be one of {choices}, got {value!r}")
        self.num_classes, self.num_grids, self.scale_ranges = num_classes, list(num_grids), scale_ranges
        self.sigma = sigma
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.centre_offset = 0.5 if target_centres == "pixel_centre" else 0.0
        self.gt_mask_resize, self.dice = gt_mask_resize, DICE_LOSSES[dice]

    def image_targets(self, target: Dict[str, torch.Tensor], feature_size: Tuple[int, int]
                      ) -> Tuple[List[LevelTargets], torch.Tensor]:
        """One image's level targets and its ``[T, *feature_size]`` mask targets; ``target``:
        ``boxes`` (XYXY), ``labels``, ``masks`` (bool over the image, unpadded). The grids
        cover ``4 x feature_size`` (the padded image)."""
        padded = (4 * feature_size[0], 4 * feature_size[1])
        levels = solo_level_targets(target["boxes"], target["masks"], target["labels"], padded, self.num_grids,
                                    self.scale_ranges, self.sigma, self.num_classes, self.centre_offset)
        return levels, gt_mask_targets(target["masks"], feature_size, self.gt_mask_resize)

    def __call__(self, logits: List[torch.Tensor], kernels: List[torch.Tensor], mask_feature: torch.Tensor,
                 targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """``logits[l] [B, N, N, K]``, ``kernels[l] [B, N, N, D]``, ``mask_feature [B, D, h, w]``,
        ``targets[b]`` as :meth:`image_targets` reads them."""
        offsets = np.cumsum([0] + [n * n for n in self.num_grids[:-1]]).tolist()
        all_labels, pred_masks, gt_masks, num_positive = [], [], [], 0
        for b, target in enumerate(targets):
            levels, masks = self.image_targets(target, tuple(mask_feature.shape[-2:]))
            all_labels.append(torch.cat([t.labels.flatten() for t in levels]))
            num_positive += sum(int(t.positive.sum()) for t in levels)
            cells = torch.cat([t.cells + offset for t, offset in zip(levels, offsets)])
            cell_kernels = torch.cat([k[b].flatten(0, 1) for k in kernels])
            pred_masks.append(dynamic_conv(mask_feature[b], cell_kernels[cells]))
            gt_masks.append(masks[torch.cat([t.gt_index for t in levels])])
        return self._losses(logits, kernels, torch.stack(all_labels), torch.cat(pred_masks), torch.cat(gt_masks),
                            num_positive)

    def _losses(self, logits, kernels, labels: torch.Tensor, pred_masks: torch.Tensor, gt_masks: torch.Tensor,
                num_positive: int) -> Dict[str, torch.Tensor]:
        flat_logits = torch.cat([x.flatten(1, 2) for x in logits], 1)
        onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].to(flat_logits.dtype)
        loss_cls = sigmoid_focal_loss(flat_logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        loss_cls = loss_cls / (num_positive + 1)
        if len(pred_masks):
            loss_mask = self.dice(pred_masks.flatten(1), gt_masks.flatten(1), len(pred_masks))
        else:  # keeps every kernel parameter in the graph
            loss_mask = sum(k.sum() for k in kernels) * 0.0 + pred_masks.sum() * 0.0
        return {"loss_cls": self.focal_weight * loss_cls, "loss_mask": self.dice_weight * loss_mask}
