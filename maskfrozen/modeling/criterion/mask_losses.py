"""Point-sampled mask losses and pairwise mask costs (sigmoid BCE and dice).

Losses take ``M`` predicted masks and their ``M`` matched targets, both sampled at the
same ``P`` points (``[M, P]``), and return a sum over masks divided by ``num_masks``
(the number of ground-truth masks, as DETR normalises its box losses). Costs take the
``Q`` predictions and ``T`` targets of one image sampled at shared points and return
``[Q, T]`` for a Hungarian matcher (Mask2Former). :func:`point_mask_losses` chains
importance sampling (:mod:`.point_sampling`) and both losses.
"""
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from .point_sampling import importance_sample_points, point_sample

__all__ = ["sigmoid_bce_loss", "dice_loss", "squared_dice_loss", "sigmoid_bce_cost", "dice_cost", "point_mask_losses"]


def _check_pair(logits: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"{name}: logits and targets must both be [M, P], got {tuple(logits.shape)} and {tuple(targets.shape)}")


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over the points of each mask, summed over
    masks / ``num_masks``."""
    _check_pair(logits, targets, "sigmoid_bce_loss")
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` per mask (p = sigmoid(logits)),
    summed over masks / ``num_masks``."""
    _check_pair(logits, targets, "dice_loss")
    probs = logits.sigmoid()
    targets = targets.to(probs.dtype)
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def squared_dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float, eps: float = 1e-3) -> torch.Tensor:
    """``1 - 2 sum(p t) / (sum p^2 + sum t^2 + 2 eps)`` per mask (p = sigmoid(logits); V-Net's
    dice, SOLO's and the official SOTR's with eps 0.001 on each sum of squares), summed over
    masks / ``num_masks``."""
    _check_pair(logits, targets, "squared_dice_loss")
    probs = logits.sigmoid()
    targets = targets.to(probs.dtype)
    numerator = 2 * (probs * targets).sum(1)
    denominator = ((probs * probs).sum(1) + eps) + ((targets * targets).sum(1) + eps)
    return (1 - numerator / denominator).sum() / num_masks


def sigmoid_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, P]`` logits, ``[T, P]`` targets -> ``[Q, T]`` mean BCE of every pair."""
    num_points = logits.shape[1]
    targets = targets.to(logits.dtype)
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, P]`` logits, ``[T, P]`` targets -> ``[Q, T]`` dice loss of every pair."""
    probs = logits.sigmoid()
    targets = targets.to(probs.dtype)
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def point_mask_losses(
    mask_logits: torch.Tensor,
    sample_targets: Callable[[torch.Tensor], torch.Tensor],
    num_masks: float,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
) -> Dict[str, torch.Tensor]:
    """Point-sampled ``{"loss_mask": BCE, "loss_dice": dice}`` of ``M`` predicted masks.

    Args:
        mask_logits: ``[M, 1, H, W]`` predicted logits; the points are importance-sampled
            on them (uncertainty ``-|logit|``).
        sample_targets: maps the ``[M, P, 2]`` normalised ``(x, y)`` point coordinates of
            the predicted maps to ``[M, P]`` target values in [0, 1]. For targets in the
            same frame use ``lambda c: point_sample(gt[:, None].float(), c)[:, 0]``; a
            mask predicted inside a box maps the points into the image first.
        num_masks: normaliser (number of GT masks, averaged over workers).
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"point_mask_losses: mask_logits must be [M, 1, H, W], got {tuple(mask_logits.shape)}")
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0  # keeps the graph: every parameter still gets a grad
        return {"loss_mask": zero, "loss_dice": zero}
    coords = importance_sample_points(mask_logits, num_points, oversample_ratio, importance_sample_ratio)
    with torch.no_grad():
        targets = sample_targets(coords)
    if tuple(targets.shape) != tuple(coords.shape[:2]):
        raise ValueError(f"point_mask_losses: sample_targets returned {tuple(targets.shape)}, expected {tuple(coords.shape[:2])}")
    logits = point_sample(mask_logits, coords)[:, 0]
    return {
        "loss_mask": sigmoid_bce_loss(logits, targets, num_masks),
        "loss_dice": dice_loss(logits, targets, num_masks),
    }
