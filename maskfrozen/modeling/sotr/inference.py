"""SOTR inference (SOLOv2's): point NMS on the class maps, score threshold, dynamic masks,
maskness, Matrix NMS and top-k.

Matrix NMS (SOLOv2, Wang et al. 2020, Eq. 4): masks sorted by score; for mask ``j``,
``decay_j = min_{i: s_i > s_j} f(iou_ij) / f(iou_{.,i})`` over higher-scored masks ``i`` of
the same class, with ``iou_{.,i} = max_{k: s_k > s_i} iou_ki`` (how much ``i`` was itself
suppressed) and ``f(u) = exp(-sigma u^2)`` (gaussian) or ``1 - u`` (linear); ``s_j <- s_j decay_j``.
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from .head import dynamic_conv

__all__ = ["point_nms", "matrix_nms", "SOTRInferenceConfig", "select_instances", "SelectedInstances"]


def point_nms(heat: torch.Tensor, kernel: int = 2) -> torch.Tensor:
    """Keep a cell's score only where it is the max of its ``kernel x kernel`` window (the
    window starting ``kernel - 1`` cells up-left, SOLO's 2x2 max-pool); ``heat [..., K, N, N]``."""
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=kernel - 1)
    hmax = hmax[..., : heat.shape[-2], : heat.shape[-1]]
    return heat * (hmax == heat).to(heat.dtype)


def matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, kernel: str = "gaussian",
               sigma: float = 2.0) -> torch.Tensor:
    """Decayed scores (module doc) of ``n`` masks sorted by descending ``scores``:
    ``masks [n, H, W]`` binary, ``labels [n]``, ``scores [n]`` -> ``[n]``."""
    n = len(labels)
    if n == 0:
        return scores
    flat = masks.reshape(n, -1).float()
    areas = flat.sum(1)
    inter = flat @ flat.T
    union = areas[:, None] + areas[None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)  # iou[i, j], i scored above j
    same = (labels[:, None] == labels[None, :]).float().triu(diagonal=1)
    decay_iou = iou * same
    compensate = decay_iou.max(0).values[:, None].expand(n, n)  # row i: max IoU of i with a better mask
    if kernel == "gaussian":  # as the official code: two exponentials, not exp(-sigma (d^2 - c^2))
        decay = torch.exp(-sigma * decay_iou ** 2) / torch.exp(-sigma * compensate ** 2)
    elif kernel == "linear":  # clamped: the official divides by 0 when a mask duplicates a better one
        decay = (1 - decay_iou) / (1 - compensate).clamp(min=1e-6)
    else:
        raise ValueError(f"MODEL.SOTR.NMS_KERNEL must be 'gaussian' or 'linear', got {kernel!r}")
    return scores * decay.min(0).values


@dataclass
class SOTRInferenceConfig:
    """``MODEL.SOTR`` test settings (SOLOv2 / SOTR defaults)."""

    score_threshold: float = 0.1
    mask_threshold: float = 0.5
    nms_pre: int = 500
    update_threshold: float = 0.05
    max_per_image: int = 100
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0
    exact_upsample: bool = False  # official: masks upsampled by ceil(h / f_h), not the mask stride
    box_min_component_share: float = 0.0  # boxes from masks: 0 = tight (postprocess.boxes_from_masks)


@dataclass
class SelectedInstances:
    """The kept instances of one image: mask probabilities at the mask-feature scale."""

    mask_probs: torch.Tensor  # [n, h, w]
    labels: torch.Tensor
    scores: torch.Tensor


def select_instances(cell_scores: torch.Tensor, cell_kernels: torch.Tensor, cell_strides: torch.Tensor,
                     mask_feature: torch.Tensor, cfg: SOTRInferenceConfig) -> SelectedInstances:
    """One image: ``cell_scores [S, K]`` (after point NMS), ``cell_kernels [S, D]``,
    ``cell_strides [S]``, ``mask_feature [D, h, w]`` -> the instances after score
    threshold, mask area > stride, maskness, top ``nms_pre``, Matrix NMS, top ``max_per_image``."""
    cells, labels = (cell_scores > cfg.score_threshold).nonzero(as_tuple=True)
    scores = cell_scores[cells, labels]
    probs = dynamic_conv(mask_feature, cell_kernels[cells]).sigmoid()
    binary = probs > cfg.mask_threshold
    areas = binary.flatten(1).sum(1).float()
    keep = areas > cell_strides[cells]
    probs, binary, areas, labels, scores = probs[keep], binary[keep], areas[keep], labels[keep], scores[keep]
    scores = scores * (probs * binary).flatten(1).sum(1) / areas  # maskness
    order = scores.argsort(descending=True)[: cfg.nms_pre]
    probs, binary, labels, scores = probs[order], binary[order], labels[order], scores[order]
    scores = matrix_nms(binary, labels, scores, cfg.nms_kernel, cfg.nms_sigma)
    keep = scores >= cfg.update_threshold
    probs, labels, scores = probs[keep], labels[keep], scores[keep]
    order = scores.argsort(descending=True)[: cfg.max_per_image]
    return SelectedInstances(probs[order], labels[order], scores[order])


def flatten_levels(per_level: List[torch.Tensor], b: int) -> torch.Tensor:
    """``[B, N_l, N_l, C]`` per level -> ``[sum S_l, C]`` of image ``b``."""
    return torch.cat([x[b].flatten(0, 1) for x in per_level])
