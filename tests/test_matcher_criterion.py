"""Hungarian matcher, per-set losses and the set criterion against hand computations."""
import itertools
import math

import pytest
import torch

from maskfrozen.modeling.criterion import (
    HungarianMatcher,
    QuerySet,
    SetCriterion,
    class_agnostic_targets,
    point_mask_costs,
    box_losses,
    class_cost_focal,
    class_loss_focal,
    class_loss_softmax,
    repeat_targets,
)
from maskfrozen.modeling.criterion.mask_losses import dice_cost, sigmoid_bce_cost


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
        HungarianMatcher({"elevation": 1.0})
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
    """The DETR entries (main + aux, encoder, denoising, one-to-many) through one criterion."""
    matcher = HungarianMatcher({"class": 2.0, "bbox": 5.0, "giou": 2.0})
    weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    crit = SetCriterion(matcher, weights, losses=["labels", "boxes"])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([_box(0.3), _box(0.6)])}]
    main = _query_set(1, 4, 3, 0)
    main["aux_outputs"] = [_query_set(1, 4, 3, 1)]
    dn, o2m, enc = _query_set(1, 4, 3, 2), _query_set(1, 6, 3, 3), _query_set(1, 4, 3, 4)
    dn_indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    rep = repeat_targets(targets, 2)
    agn = class_agnostic_targets(targets)
    losses = crit([QuerySet(main), QuerySet(enc, "_enc", agn), QuerySet(dn, "_dn", indices=dn_indices),
                   QuerySet(o2m, "_one2many", rep, weight=0.5, normalizer=2)], targets)
    expected = {f"loss_{t}{s}" for t in ("class", "bbox", "giou")
                for s in ("", "_aux0", "_enc", "_dn", "_one2many")}
    assert set(losses) == expected

    # main set: weight x unweighted term at the Hungarian matching
    raw = crit.layer_losses(main, targets, matcher(main, targets), 2.0)
    assert torch.isclose(losses["loss_bbox"], 5.0 * raw["loss_bbox"])
    # denoising uses its fixed matching, not Hungarian
    raw_dn = crit.layer_losses(dn, targets, dn_indices, 2.0)
    assert torch.isclose(losses["loss_giou_dn"], 2.0 * raw_dn["loss_giou"])
    # one-to-many: repeated targets, num_boxes x k, extra weight lambda
    raw_o2m = crit.layer_losses(o2m, rep, matcher(o2m, rep), 4.0)
    assert torch.isclose(losses["loss_class_one2many"], 0.5 * raw_o2m["loss_class"])
    assert sum(len(i) for i, _ in matcher(o2m, rep)) == 4
    # encoder proposals: class-agnostic labels
    assert agn[0]["labels"].tolist() == [0, 0]
    raw_enc = crit.layer_losses(enc, agn, matcher(enc, agn), 2.0)
    assert torch.isclose(losses["loss_class_enc"], raw_enc["loss_class"])
    with pytest.raises(ValueError, match="distinct suffixes"):
        crit([QuerySet(main), QuerySet(enc)], targets)
    with pytest.raises(ValueError, match="unknown loss terms"):
        SetCriterion(matcher, weights, losses=["labels", "location"])


def _mask_query_set(b, q, k, size, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, k + 1, generator=g), "pred_masks": torch.randn(b, q, size, size, generator=g)}


def _mask_targets(size):
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 2:6, 1:5] = True
    masks[1, 8:14, 6:15] = True
    return [{"labels": torch.tensor([0, 2]), "masks": masks}]


def test_mask_only_set_softmax_labels_and_point_sampled_masks():
    """A set without boxes (Mask2Former-like): softmax class loss + point-sampled mask
    terms; with as many points as pixels at their centres, BCE and dice equal the dense
    losses over every pixel."""
    size = 16
    matcher = HungarianMatcher({"class": 2.0, "mask": 5.0, "dice": 5.0}, class_cost="softmax", num_mask_points=50)
    crit = SetCriterion(matcher, {"loss_class": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
                        losses=["labels", "masks"], class_loss="softmax", num_points=size * size,
                        importance_sample_ratio=0.0)
    outputs, targets = _mask_query_set(1, 5, 3, size, 0), _mask_targets(size)
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0]))]
    losses = crit([QuerySet(outputs, indices=indices)], targets)
    assert set(losses) == {"loss_class", "loss_mask", "loss_dice"}
    pred = outputs["pred_masks"][0, [1, 3]].flatten(1)
    gt = targets[0]["masks"][[1, 0]].flatten(1).float()
    dense_bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, gt, reduction="none").mean(1).sum() / 2
    probs = pred.sigmoid()
    dense_dice = (1 - (2 * (probs * gt).sum(1) + 1) / (probs.sum(1) + gt.sum(1) + 1)).sum() / 2
    # uniform random points: the point estimate is close to the dense loss, not equal
    assert abs(losses["loss_mask"].item() / 5.0 - dense_bce.item()) < 0.1 * dense_bce.item()
    assert abs(losses["loss_dice"].item() / 5.0 - dense_dice.item()) < 0.1 * dense_dice.item()
    hungarian = crit([QuerySet(outputs)], targets)
    assert set(hungarian) == set(losses) and all(torch.isfinite(v) for v in hungarian.values())


def test_fixed_assignment_set_uses_its_indices_on_every_layer():
    """A fixed-assignment entry (DINO denoising, FastInst's GT-guided set): every layer is
    supervised with the given indices, never re-matched, normaliser scaled."""
    matcher = HungarianMatcher({"class": 1.0, "bbox": 1.0})
    crit = SetCriterion(matcher, {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0})
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([_box(0.3), _box(0.6)])}]
    outputs = _query_set(1, 4, 3, 5)
    outputs["aux_outputs"] = [_query_set(1, 4, 3, 6)]
    fixed = [(torch.tensor([3, 0]), torch.tensor([0, 1]))]
    losses = crit([QuerySet(outputs, "_gt", indices=fixed, normalizer=3.0)], targets)
    for suffix, layer in (("_gt", outputs), ("_gt_aux0", outputs["aux_outputs"][0])):
        raw = crit.layer_losses(layer, targets, fixed, 2.0 * 3.0)
        for term in ("class", "bbox", "giou"):
            assert torch.isclose(losses[f"loss_{term}{suffix}"], raw[f"loss_{term}"])


def test_point_sampled_mask_costs_equal_dense_costs_at_pixel_centres():
    """The matcher's point-sampled BCE/dice costs, read at every pixel centre, equal the
    dense costs over all pixels; the matcher uses the same points for all pairs."""
    size = 12
    outputs, targets = _mask_query_set(1, 4, 3, size, 1), _mask_targets(size)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], -1) / size
    costs = point_mask_costs(outputs["pred_masks"][0], targets[0]["masks"], centres)
    pred, gt = outputs["pred_masks"][0].flatten(1), targets[0]["masks"].flatten(1).float()
    assert torch.allclose(costs["mask"], sigmoid_bce_cost(pred, gt), atol=1e-6)
    assert torch.allclose(costs["dice"], dice_cost(pred, gt), atol=1e-6)

    class PixelCentreMatcher(HungarianMatcher):
        def mask_points(self, device):
            return centres

    matcher = PixelCentreMatcher({"mask": 5.0, "dice": 5.0})
    dense_total = 5.0 * sigmoid_bce_cost(pred, gt) + 5.0 * dice_cost(pred, gt)
    assert torch.allclose(matcher.cost_matrix({"pred_masks": outputs["pred_masks"][0]}, targets[0]), dense_total,
                          atol=1e-5)
    (rows, cols), = matcher(outputs, targets)
    best = min(sum(dense_total[q, t] for t, q in enumerate(p)) for p in itertools.permutations(range(4), 2))
    assert torch.isclose(dense_total[rows, cols].sum(), best)
    with pytest.raises(ValueError, match="inside boxes"):
        matcher.cost_matrix({"pred_masks": outputs["pred_masks"][0], "pred_mask_boxes": torch.rand(4, 4)}, targets[0])


def test_criterion_no_targets_gives_finite_losses_with_grads():
    crit = SetCriterion(HungarianMatcher({"class": 2.0, "bbox": 5.0}), {"loss_class": 1.0, "loss_bbox": 5.0})
    out = _query_set(2, 3, 2, 0)
    out["pred_boxes"].requires_grad_(True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = crit([QuerySet(out)], [empty, empty])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and out["pred_boxes"].grad is not None
