"""Golden test of Co-DINO against the official Sense-X/Co-DETR (mmdet 2) implementation
(fixtures written by tools/golden/official_co_dino.py; see tests/golden/README.md and
docs/fidelity/co_detr.md).

The case holds a reduced official Co-DINO (mmdet ResNet-18 of width 8, embed 32, 2 + 2
layers, 40 queries, K=2 auxiliary heads, 80 classes, random weights) in the official
checkpoint format and its outputs on two images of different sizes (batched to 128 x 128 with
padding, reported at another output size). The test converts the checkpoint with
tools/convert_checkpoint.py --format co_detr (every tensor mapped), builds the shipped COCO
Co-DINO config with the same reductions, loads strictly, runs in float64 (as the official run
did) and compares: the neck's five levels, the adapter levels (encoder memory + the extra
stride-2 level), the two-stage top-k logits and boxes, every decoder layer's logits and boxes,
and the final detections through ``forward`` (top-900 pairs, boxes clamped, class-wise
soft-NMS, 300 kept, at the output size). Training, on one batch with GT (a 3 x 3 px box among
them): the one-to-one queries' and encoder proposals' losses (quality focal loss), every
ATSS anchor's label and the ATSS losses, every valid RPN anchor's assignment, and the ATSS
positive-query group (its size, positives, negatives after them), and every positive-query
loss term of both heads on the official groups (their random negatives and RoI samples
replayed).

What each check caught in the code before this pass: the detections (top-100 vs the official
top-900 + soft-NMS), the query-head class losses (focal vs quality focal: 1.0 apart), the
ATSS class loss (anchors on the padding counted as negatives: 0.012 apart), the RPN
assignment (no min_pos_iou: the 3 px box got a positive), the group (masked padding instead
of negatives; clipped boxes).
"""
import os

import pytest
import torch
from detectron2.modeling import build_model

from golden_compare import REPO, assert_trees_close, case, convert_official
from maskfrozen.config import load_config

ATOL = 1e-5  # intermediate features are stored as float32


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    c = case("co_dino")
    meta = c["meta"]
    config = os.path.join(REPO, meta["maskfrozen_config"])
    out = str(tmp_path_factory.mktemp("co_dino") / "converted.pth")
    opts = tuple(meta["maskfrozen_opts"]) + ("MODEL.DEVICE", "cpu")
    report = convert_official("co_detr", config, c["checkpoint"], out, opts=opts)
    cfg = load_config(config, list(opts) + ["MODEL.WEIGHTS", out], freeze=False)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    state = torch.load(out, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return c, model, report


def _batched_inputs(c):
    inputs = c["inputs"]
    return [{"image": image, "height": oh, "width": ow}
            for image, (oh, ow) in zip(inputs["images"], inputs["output_sizes"])]


def test_converter_maps_every_official_tensor(golden):
    c, model, report = golden
    """272 official tensors (+ 20 BatchNorm num_batches_tracked counters, not parameters) -> 272
    of our 277 keys; the other 5 are the neck convs' biases, which mmdet's ConvModule (conv +
    GN) does not have: filled with zeros, the same function."""
    official = torch.load(c["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    tensors = [k for k in official if not k.endswith("num_batches_tracked")]
    assert not report.unused_source_keys and not report.unmatched_target_keys
    assert len(report.renamed) == len(tensors) == report.num_source_tensors == 272
    assert sorted(report.zero_filled) == [f"neck.convs.{i}.conv.bias" for i in range(4)] + [
        "neck.extra_convs.0.conv.bias"]
    assert report.num_target_keys == 277


def test_inference_stage_by_stage(golden):
    c, model, _ = golden
    expected = c["outputs"]["inference"]
    batch = _batched_inputs(c)
    values = {}
    neck_forward = model.neck.forward

    def recording_neck(*args, **kwargs):
        values["neck"] = neck_forward(*args, **kwargs)
        return values["neck"]
    model.neck.forward = recording_neck
    with torch.no_grad():
        images = model.preprocess_image(batch)
        detected = model.detect(images)
        results = model(batch)
    model.neck.forward = neck_forward
    out = detected.transformer
    ours = {
        "neck": [x.float() for x in values["neck"]],
        "adapter": [x.float() for x in model.co_detr.adapter(out)],
        "logits": list(out.pred_logits[:, :, out.query_groups["one2one"]]),
        "boxes": list(out.pred_boxes[:, :, out.query_groups["one2one"]]),
        "enc_topk_logits": out.proposals.selected_logits, "enc_topk_boxes": out.proposals.selected_boxes,
    }
    official = {k: v for k, v in expected.items() if k != "detections"}
    diffs = assert_trees_close(ours, official, atol=ATOL, what="Co-DINO inference")
    detections = [{"boxes": r["instances"].pred_boxes.tensor, "scores": r["instances"].scores,
                   "labels": r["instances"].pred_classes} for r in results]
    diffs.update(assert_trees_close(detections, expected["detections"], atol=1e-4, what="Co-DINO detections"))
    print({k: f"{v:.2e}" for k, v in sorted(diffs.items())})


# ----------------------------------------------------------------------------- training
def _training_batch(c, model):
    from detectron2.structures import Boxes, Instances

    batch = _batched_inputs(c)
    for x, t, (h, w) in zip(batch, c["inputs"]["targets"], c["inputs"]["image_sizes"]):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(t["boxes"].double())
        inst.gt_classes = t["labels"]
        x["instances"] = inst
    images = model.preprocess_image(batch)
    return batch, images, model.prepare_targets(batch, images.image_sizes)


def _official_losses(c, names):
    losses = c["outputs"]["training"]["losses"]
    return {k: losses[k].sum() for k in names}


def test_query_head_matching_and_encoder_losses(golden):
    """The one-to-one queries' and the encoder proposals' losses with the official quality
    focal loss (the matching part never sees the denoising queries, so no noise to replay)."""
    c, model, _ = golden
    model.train()
    try:
        batch, images, targets = _training_batch(c, model)
        with torch.no_grad():
            detected = model.detect(images)  # no targets: no denoising queries
            losses = model.criterion(model.query_sets(detected, targets), targets)
    finally:
        model.eval()
    names = {"loss_cls": "loss_class", "loss_bbox": "loss_bbox", "loss_iou": "loss_giou",
             "d0.loss_cls": "loss_class_aux0", "d0.loss_bbox": "loss_bbox_aux0", "d0.loss_iou": "loss_giou_aux0",
             "enc_loss_cls": "loss_class_enc", "enc_loss_bbox": "loss_bbox_enc", "enc_loss_iou": "loss_giou_enc"}
    official = _official_losses(c, names)
    ours = {k: losses[v] for k, v in names.items()}
    diffs = assert_trees_close(ours, official, atol=1e-6, what="Co-DINO query-head losses")
    print({k: f"{v:.2e}" for k, v in sorted(diffs.items())})


def test_auxiliary_heads_targets_and_atss_losses(golden):
    """ATSS: every anchor's label (background 80) and the three losses (x lambda_2 x layers);
    RPN: every valid anchor's assignment (mmdet: 0 negative, -1 ignored, i + 1 GT i) through
    our anchors (detectron2's size-major order mapped to mmdet's ratio-major) and matcher;
    ATSS positive-query group: size, the positives' boxes and classes, negatives after them."""
    from detectron2.structures import Boxes, pairwise_iou

    c, model, _ = golden
    official = c["outputs"]["training"]
    batch, images, targets = _training_batch(c, model)
    co = model.co_detr
    with torch.no_grad():
        features = co.adapter(model.detect(images).transformer)
        gt = [x["instances"] for x in batch]
        atss_losses, positives = co.heads[1](images, features, gt)
    num_anchors = positives[0].boxes.shape[0] + positives[0].negative_boxes.shape[0]
    labels = []
    for p, inst in zip(positives, gt):
        anchor_labels = torch.full((num_anchors,), 80, dtype=torch.int8)
        anchors = torch.cat([b.tensor for b in co.heads[1].anchor_generator(features)])
        index = {tuple(a.tolist()): i for i, a in enumerate(anchors)}
        for box, g in zip(p.boxes, p.gt_index):
            anchor_labels[index[tuple(box.tolist())]] = int(inst.gt_classes[g])
        labels.append(anchor_labels)
    diffs = assert_trees_close(labels, official["atss_labels"], what="ATSS anchor labels")
    names = {"loss_cls1": "loss_atss_cls", "loss_bbox1": "loss_atss_bbox", "loss_centerness1": "loss_atss_centerness"}
    ours = {k: atss_losses[v] * co.enc_weight for k, v in names.items()}
    diffs.update(assert_trees_close(ours, _official_losses(c, names), atol=1e-6, what="ATSS losses"))
    # RPN assignment of the valid anchors
    rpn = co.heads[0].rpn
    anchors = rpn.anchor_generator(features)
    assigned = []
    for inst, valid in zip(gt, official["rpn_valid"]):
        per_level = []
        for a in anchors:  # detectron2: (y, x, size, ratio) -> mmdet: (y, x, ratio, size)
            per_level.append(a.tensor.view(-1, 3, 3, 4).transpose(1, 2).reshape(-1, 4))
        flat = Boxes(torch.cat(per_level)[valid.bool()])
        matched, match_labels = rpn.anchor_matcher(pairwise_iou(inst.gt_boxes, flat))
        assigned.append(torch.where(match_labels == 1, matched + 1, match_labels).to(torch.int8))
    diffs.update(assert_trees_close(assigned, official["rpn_assigned"], what="RPN assignment"))
    # the RPN's labelling: anchors on the padding ignored, the positives (all kept by the 50 %
    # sampler here) those of the official assignment
    torch.manual_seed(0)
    labels, _ = rpn.label_and_sample_anchors(anchors, gt)
    for ours_i, valid, official_i in zip(labels, official["rpn_valid"], official["rpn_assigned"]):
        order = torch.cat([torch.arange(len(a)).view(-1, 3, 3).transpose(1, 2).reshape(-1) + start for a, start in
                           zip(anchors, torch.tensor([0] + [len(a) for a in anchors]).cumsum(0)[:-1].tolist())])
        ours_mmdet_order = ours_i[order]
        assert (ours_mmdet_order[~valid.bool()] == -1).all()
        assert torch.equal(ours_mmdet_order[valid.bool()] == 1, official_i > 0)
    # the ATSS head's positive-query group (positives deterministic; negatives random: count only)
    group = official["groups"][1]
    size = group["labels"].shape[1]
    from maskfrozen.modeling.co_detr.positive_queries import batch_positives

    q = batch_positives(positives, images.image_sizes, co.max_positives, model.hidden_dim, co.min_queries,
                        co.pad_with_negatives, co.clip_positive_boxes)
    assert q.boxes.shape[1] == size
    for b in range(len(gt)):
        n = len(q.indices[b][1])
        assert int(group["bbox_weights"][b].sum()) == n
        diffs[f"group{b}.boxes"] = (q.boxes[b, :n] - group["boxes"][b, :n]).abs().max().item()
        assert diffs[f"group{b}.boxes"] < 1e-6  # our anchors are float32 (detectron2 generator)
        assert gt[b].gt_classes[q.indices[b][1]].tolist() == group["labels"][b, :n].tolist()
        assert (group["labels"][b, n:] == 80).all() and not q.padded[b].any()
    print({k: f"{v:.2e}" for k, v in sorted(diffs.items())})


def test_positive_query_losses_on_the_official_groups(golden):
    """Both heads' positive-query groups as the official run built them (its random negatives
    and RoI sampling replayed: the official boxes and labels fed to ours), decoded by our
    detector and supervised by our criterion: every loss term of every layer."""
    from maskfrozen.modeling.co_detr.positive_queries import PositiveQueries, positive_query_sets

    c, model, _ = golden
    co = model.co_detr
    batch, images, targets = _training_batch(c, model)
    groups = []
    for group in c["outputs"]["training"]["groups"]:
        n, p = group["labels"].shape
        indices = []
        for b, t in enumerate(targets):
            slots = torch.nonzero(group["labels"][b] < 80).squeeze(1)
            gt = torch.cdist(group["targets"][b, slots].double(), t["boxes"].double()).argmin(1)
            assert torch.equal(t["labels"][gt], group["labels"][b, slots])
            indices.append((slots, gt))
        groups.append(PositiveQueries(group["boxes"].double(), torch.zeros(n, p, model.hidden_dim, dtype=torch.float64),
                                      torch.zeros(n, p, dtype=torch.bool), indices,
                                      int(sum(len(s) for s, _ in indices))))
    with torch.no_grad():
        encoded = model.detect(images).transformer
        sets = positive_query_sets(model, encoded, groups, co.query_embeddings, co.lambda_1,
                                   sum(len(t["labels"]) for t in targets))
        losses = model.criterion(sets, targets)
    names = {}
    for i in range(2):
        for official_term, term in (("cls", "class"), ("bbox", "bbox"), ("iou", "giou")):
            names[f"loss_{official_term}_aux{i}"] = f"loss_{term}_pos{i}"
            names[f"d0.loss_{official_term}_aux{i}"] = f"loss_{term}_pos{i}_aux0"
    ours = {k: losses[v] for k, v in names.items()}
    # GIoU terms <= 2.2e-6 apart: torchvision's GIoU adds eps 1e-7 to normalised areas, mmdet
    # computes on pixel boxes (max(area, eps)); every other term <= 5e-8
    diffs = assert_trees_close(ours, _official_losses(c, names), atol=5e-6, what="positive-query losses")
    print({k: f"{v:.2e}" for k, v in sorted(diffs.items())})
