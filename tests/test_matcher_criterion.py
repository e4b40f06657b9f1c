"""Hungarian matcher, per-set losses and the set criterion against hand computations."""
import itertools
import math

import pytest
import torch

from maskfrozen.modeling.criterion import (
    HungarianMatcher,
    SetCriterion,
    box_losses,
    class_cost_focal,
    class_loss_focal,
    class_loss_softmax,
    repeat_targets,
)


def _box(cx, cy=0.5, w=0.1, h=0.1):
    return [cx, cy, w, h]


def test_matcher_hand_built_assignment():
    """Queries at x = 0.1, 0.5, 0.9; targets at x = 0.85 and 0.15: the L1-optimal
    assignment is query 0 -> target 1 and query 2 -> target 0; query 1 unmatched."""
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.tensor([[_box(0.1), _box(0.5), _box(0.9)]])}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([_box(0.85), _box(0.15)])}]
    matcher = HungarianMatcher({"bbox": 1.0})
    (rows, cols), = matcher(outputs, targets)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]


def test_matcher_beats_greedy_and_uses_class_cost():
    """Cost [[0, 1], [1, 10]] (greedy takes 0->0 then 1->1 = 10); optimum 0->1, 1->0 = 2.
    Built with the class cost alone: logit l gives focal cost f(l); pick logits so the
    class cost matrix has that order."""
    # query 0 is confident in both classes, query 1 only in class 0
    logits = torch.tensor([[[4.0, 4.0], [4.0, -4.0]]])
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    (rows, cols), = HungarianMatcher({"class": 1.0})(outputs, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_matcher_equals_brute_force_with_all_costs():
    torch.manual_seed(0)
    matcher = HungarianMatcher({"class": 2.0, "bbox": 5.0, "giou": 2.0})
    outputs = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4) * 0.4 + 0.1}
    targets = [
        {"labels": torch.tensor([2, 0, 1]), "boxes": torch.rand(3, 4) * 0.4 + 0.1},
        {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix({k: v[0] for k, v in outputs.items()}, targets[0])
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    rows, cols = indices[0]
    assert torch.isclose(cost[rows, cols].sum(), torch.as_tensor(best))
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0


def test_matcher_rejects_nan_and_unknown_cost():
    with pytest.raises(ValueError, match="no cost function"):
        HungarianMatcher({"mask": 1.0})
    outputs = {"pred_logits": torch.full((1, 2, 2), float("nan")), "pred_boxes": torch.rand(1, 2, 4)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}]
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher({"class": 1.0})(outputs, targets)


def test_focal_cost_hand_computation():
    p = 0.8
    logit = math.log(p / (1 - p))
    cost = class_cost_focal(torch.tensor([[logit, 0.0]]), torch.tensor([0]), alpha=0.25, gamma=2.0)
    expected = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p ** 2 * -math.log(1 - p)
    assert cost.shape == (1, 1) and abs(cost.item() - expected) < 1e-6


def _focal(p, positive, alpha=0.25, gamma=2.0):
    if positive:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def test_class_loss_focal_hand_computation():
    """2 queries x 2 classes; query 1 matched to a class-1 target; / num_boxes = 2."""
    probs = [[0.3, 0.6], [0.2, 0.9]]
    logits = torch.tensor([probs]).logit()
    targets = [{"labels": torch.tensor([1])}]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    loss = class_loss_focal(logits, targets, indices, num_boxes=2.0)
    expected = (_focal(0.3, False) + _focal(0.6, False) + _focal(0.2, False) + _focal(0.9, True)) / 2.0
    assert abs(loss.item() - expected) < 1e-6


def test_class_loss_softmax_hand_computation():
    """One matched query (class 0) and one "no object" query weighted by eos_coef."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    targets = [{"labels": torch.tensor([0])}]
    loss = class_loss_softmax(logits, targets, [(torch.tensor([0]), torch.tensor([0]))], 1.0, eos_coef=0.1)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(math.e / (math.e + 2))
    assert abs(loss.item() - (ce0 + 0.1 * ce1) / 1.1) < 1e-6


def test_box_losses_hand_computation():
    """pred (0.5, 0.5, 0.2, 0.2) vs target (0.6, 0.5, 0.2, 0.2): L1 = 0.1; IoU = 1/3 and
    the enclosing box equals the union, so GIoU = 1/3 and the loss is 2/3."""
    pred = torch.tensor([[_box(0.9), _box(0.5, w=0.2, h=0.2)]])
    targets = [{"boxes": torch.tensor([_box(0.6, w=0.2, h=0.2)])}]
    losses = box_losses(pred, targets, [(torch.tensor([1]), torch.tensor([0]))], num_boxes=1.0)
    assert abs(losses["loss_bbox"].item() - 0.1) < 1e-6
    assert abs(losses["loss_giou"].item() - 2.0 / 3.0) < 1e-6


def test_repeat_targets_one2many():
    t = [{"labels": torch.tensor([3, 1]), "boxes": torch.tensor([_box(0.2), _box(0.7)])}]
    (r,) = repeat_targets(t, 3)
    assert r["labels"].tolist() == [3, 1, 3, 1, 3, 1]
    assert r["boxes"].shape == (6, 4) and torch.equal(r["boxes"][4], t[0]["boxes"][0])


def _query_set(b, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, k, generator=g), "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + 0.3}


def test_criterion_keys_weights_and_sets():
    matcher = HungarianMatcher({"class": 2.0, "bbox": 5.0, "giou": 2.0})
    weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    crit = SetCriterion(matcher, weights, one2many_repeats=2, one2many_weight=0.5, enc_class_agnostic=True)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([_box(0.3), _box(0.6)])}]
    main = _query_set(1, 4, 3, 0)
    main["aux_outputs"] = [_query_set(1, 4, 3, 1)]
    dn = _query_set(1, 4, 3, 2)
    dn.update(indices=[(torch.tensor([0, 1]), torch.tensor([0, 1]))], num_groups=1)
    o2m = _query_set(1, 6, 3, 3)
    enc = _query_set(1, 4, 3, 4)
    outputs = {**main, "dn_outputs": dn, "one2many_outputs": o2m, "enc_outputs": enc}
    losses = crit(outputs, targets)
    expected = {f"loss_{t}{s}" for t in ("class", "bbox", "giou")
                for s in ("", "_aux0", "_enc", "_dn", "_one2many")}
    assert set(losses) == expected

    # main set: weight x unweighted term at the Hungarian matching
    idx = matcher(main, targets)
    raw = crit.set_losses(main, targets, idx, 2.0)
    assert torch.isclose(losses["loss_bbox"], 5.0 * raw["loss_bbox"])
    # denoising uses its fixed matching, not Hungarian
    raw_dn = crit.set_losses(dn, targets, dn["indices"], 2.0)
    assert torch.isclose(losses["loss_giou_dn"], 2.0 * raw_dn["loss_giou"])
    # one-to-many: repeated targets, num_boxes x k, extra weight lambda
    rep = repeat_targets(targets, 2)
    raw_o2m = crit.set_losses(o2m, rep, matcher(o2m, rep), 4.0)
    assert torch.isclose(losses["loss_class_one2many"], 0.5 * raw_o2m["loss_class"])
    assert sum(len(i) for i, _ in matcher(o2m, rep)) == 4
    # encoder proposals: class-agnostic labels
    agn = [{**targets[0], "labels": torch.zeros(2, dtype=torch.int64)}]
    raw_enc = crit.set_losses(enc, agn, matcher(enc, agn), 2.0)
    assert torch.isclose(losses["loss_class_enc"], raw_enc["loss_class"])


def test_criterion_no_targets_gives_finite_losses_with_grads():
    crit = SetCriterion(HungarianMatcher({"class": 2.0, "bbox": 5.0}), {"loss_class": 1.0, "loss_bbox": 5.0})
    out = _query_set(2, 3, 2, 0)
    out["pred_boxes"].requires_grad_(True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = crit(out, [empty, empty])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and out["pred_boxes"].grad is not None
