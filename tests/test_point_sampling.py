"""Shared point sampling and point-sampled mask losses, checked against hand computations."""
import math

import pytest
import torch

from maskfrozen.modeling.criterion.mask_losses import (
    dice_cost,
    dice_loss,
    point_mask_losses,
    sigmoid_bce_cost,
    sigmoid_bce_loss,
)
from maskfrozen.modeling.criterion.point_sampling import importance_sample_points, point_sample, replay_points


def test_point_sample_reads_pixel_centres_and_interpolates():
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # pixel (row 0, col 1) has its centre at x = 0.75, y = 0.25; the map centre averages all four
    coords = torch.tensor([[[0.75, 0.25], [0.5, 0.5], [0.25, 0.5]]])
    out = point_sample(grid, coords)
    assert out.shape == (1, 1, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([2.0, 2.5, 2.0]))


def test_point_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="coords"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, 5, 2))


def test_importance_sampling_picks_uncertain_points():
    # logits are 0 (maximally uncertain) only in the left column of 4: x in [0, 0.25)
    logits = torch.full((3, 1, 8, 4), 10.0)
    logits[..., 0] = 0.0
    torch.manual_seed(0)
    coords = importance_sample_points(logits, num_points=40, oversample_ratio=8.0, importance_sample_ratio=0.5)
    assert coords.shape == (3, 40, 2)
    important, uniform = coords[:, :20], coords[:, 20:]
    assert (important[..., 0] < 0.25 + 1 / 8).all()  # bilinear support of the uncertain column
    assert (uniform[..., 0] > 0.4).any()
    with pytest.raises(ValueError, match="oversample_ratio"):
        importance_sample_points(logits, 4, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        importance_sample_points(logits, 4, importance_sample_ratio=1.5)


def test_losses_and_costs_match_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: BCE(x, 1) = sp(-x), BCE(x, 0) = sp(x)
    bce0 = (sp(-0.0) + sp(2.0)) / 2
    bce1 = (sp(-1.0) + sp(-1.0)) / 2
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets, 2.0), torch.tensor((bce0 + bce1) / 2))
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    dice0 = 1 - (2 * s(0.0) + 1) / (s(0.0) + s(2.0) + 1 + 1)
    dice1 = 1 - (2 * s(1.0) + 1) / (s(-1.0) + s(1.0) + 1 + 1)
    torch.testing.assert_close(dice_loss(logits, targets, 1.0), torch.tensor(dice0 + dice1))
    # a cost entry is the loss of that pair alone
    bce_c, dice_c = sigmoid_bce_cost(logits, targets), dice_cost(logits, targets)
    for q in range(2):
        for t in range(2):
            torch.testing.assert_close(bce_c[q, t], sigmoid_bce_loss(logits[q : q + 1], targets[t : t + 1], 1.0))
            torch.testing.assert_close(dice_c[q, t], dice_loss(logits[q : q + 1], targets[t : t + 1], 1.0))


def test_point_mask_losses_train_towards_target():
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 4:12, 4:12] = 1
    target[1, :, :, :8] = 1
    logits = torch.zeros(2, 1, 16, 16, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)
    sample = lambda c: point_sample(target, c)[:, 0]  # noqa: E731
    torch.manual_seed(0)
    for _ in range(30):
        losses = point_mask_losses(logits, sample, num_masks=2, num_points=64)
        opt.zero_grad()
        (losses["loss_mask"] + losses["loss_dice"]).backward()
        opt.step()
    pixel_accuracy = ((logits.detach() > 0) == (target > 0.5)).float().mean()
    assert pixel_accuracy > 0.95
    empty = point_mask_losses(torch.zeros(0, 1, 4, 4, requires_grad=True), sample, 1.0, 8)
    assert empty["loss_mask"].item() == 0.0 and empty["loss_mask"].requires_grad


def test_replayed_draws_replace_the_random_ones_in_call_order():
    """Inside replay_points the importance sampling's candidates and fresh points are the given
    draws (here: the candidates' first 3 rows are the most uncertain ones, logit 0 at x < 0.5);
    a draw of the wrong size or one too many is an error naming the problem."""
    logits = torch.full((1, 1, 4, 4), 5.0)
    logits[..., :2] = 0.0  # uncertain left half
    candidates = torch.tensor([[[0.1, 0.1], [0.2, 0.9], [0.3, 0.5], [0.9, 0.9], [0.8, 0.2], [0.7, 0.7]]])
    fresh = torch.tensor([[[0.6, 0.4]]])
    with replay_points([candidates, fresh]) as rest:
        coords = importance_sample_points(logits, num_points=4, oversample_ratio=1.5, importance_sample_ratio=0.75)
    assert next(rest, None) is None
    assert sorted(coords[0, :3].tolist()) == sorted(candidates[0, :3].tolist()) and torch.equal(coords[0, 3], fresh[0, 0])
    with pytest.raises(ValueError, match="out of step"), replay_points([torch.zeros(1, 5, 2)]):
        importance_sample_points(logits, num_points=4, oversample_ratio=1.5)
    with pytest.raises(RuntimeError, match="ran out"), replay_points([candidates]):
        importance_sample_points(logits, num_points=4, oversample_ratio=1.5)

