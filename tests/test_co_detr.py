"""Co-DETR on the DETR meta-arch (maskfrozen/modeling/co_detr): ATSS assignment against a
hand computation, the adapter's strides, positive queries reaching the decoder in training
only, bit-identical eval outputs with and without MODEL.CO_DETR, a training step for each K,
the R-CNN positives' GT indices, masked padding, the public Co-DINO checkpoint converter on a
synthetic state_dict, DDP (gloo) replicas with the auxiliary heads on, and the CPU fast paths
(SparseGradROIPooler, TruncatedNMSRPN, the fused RPN / ATSS output convs) against the detectron2
modules and separate convs they replace."""
import ast
import math
import os
import re
import shutil

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torchvision.ops import box_iou, sigmoid_focal_loss

import maskfrozen  # noqa: F401  (registers the models)
from maskfrozen.checkpoint import convert_co_detr_state_dict
from maskfrozen.checkpoint.co_detr_converter import permute_rpn_anchors
from maskfrozen.config import load_config
from maskfrozen.modeling.co_detr import (AuxPositives, atss_assign, batch_positives, centerness_target,
                                        positive_query_sets)
from maskfrozen.modeling.co_detr.positive_queries import PADDED_LOGIT

from test_detr_model import _inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "shapes", "co_detr", "co_dino_R18_tiny.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*opts):
    return load_config(TINY, opts, freeze=False)


# ----------------------------------------------------------------------------- ATSS
def test_atss_assignment_equals_hand_computation():
    """Level 0: four 10x10 anchors, level 1: one 20x20 anchor, top-2 per level.
    GT0 [2,3,12,12] (centre 7,7.5): candidates A0 (d 3.20), A2 (7.76) and A4; IoUs
    56/134 = .4179, 16/174 = .0920, 90/400 = .2250 -> threshold mean .2450 + std .1639 =
    .4089: only A0 (centre 5,5 inside). GT1 [10,8,20,20] (centre 15,14): candidates A3 (d 1),
    A1 (9) and A4; IoUs 100/120 = .8333, 20/200 = .1, 120/400 = .3 -> .4111 + .3791 = .7902:
    only A3 (centre 15,15 inside)."""
    level0 = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]], dtype=torch.float32)
    level1 = torch.tensor([[0, 0, 20, 20]], dtype=torch.float32)
    gt = torch.tensor([[2, 3, 12, 12], [10, 8, 20, 20]], dtype=torch.float32)
    assert atss_assign([level0, level1], gt, topk=2).tolist() == [0, -1, -1, 1, -1]
    # a candidate over the threshold whose centre is outside its GT is negative: GT [0,0,4.9,4.9]
    # has A0 (IoU .24, centre 5,5 just outside) as its best candidate
    assert atss_assign([level0, level1], torch.tensor([[0.0, 0.0, 4.9, 4.9]]), topk=2).tolist() == [-1] * 5
    # no GT: every anchor negative
    assert atss_assign([level0, level1], torch.zeros(0, 4), topk=2).tolist() == [-1] * 5
    # centerness of anchor centre (5,5) in GT [2,3,12,12]: l,r = 3,7; t,b = 2,7
    expected = math.sqrt(3 / 7 * 2 / 7)
    assert centerness_target(level0[:1], gt[:1]).item() == pytest.approx(expected, rel=1e-6)


def test_rpn_anchor_order_and_converter_permutation():
    """Detectron2's anchors are size-major; mmdet's ratio-major: index r*S+s of the public
    rpn_cls channels moves to s*R+r."""
    gen = DefaultAnchorGenerator(sizes=[[16, 32, 64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[8], offset=0.0)
    cell = gen.generate_cell_anchors((16, 32, 64), (0.5, 1.0, 2.0))
    wh = cell[:, 2:] - cell[:, :2]
    assert torch.allclose(wh[1], torch.tensor([16.0, 16.0]))  # index 1 = size 16, ratio 1 (s*R + r)
    mmdet = torch.arange(9.0)  # value = mmdet index r*3 + s
    ours = permute_rpn_anchors(mmdet, 3, 3)
    assert ours.tolist() == [r * 3 + s for s in range(3) for r in range(3)]
    reg = torch.arange(36.0)  # 4 deltas per anchor stay together
    assert permute_rpn_anchors(reg, 3, 3).view(9, 4)[1].tolist() == [12.0, 13.0, 14.0, 15.0]


# ----------------------------------------------------------------------------- model
def test_adapter_levels_have_the_expected_strides():
    model = build_model(tiny_cfg()).eval()
    adapter = model.co_detr.adapter
    assert adapter.strides == model.level_strides + [2 * model.level_strides[-1]] == [8, 16, 32, 64, 128]
    inputs = _inputs(((128, 96), (96, 64)))
    with torch.no_grad():
        detected = model.detect(model.preprocess_image(inputs))
        maps = adapter(detected.transformer)
    padded = detected.images.tensor.shape[-2:]
    assert [tuple(m.shape[-2:]) for m in maps] == [
        (math.ceil(padded[0] / s), math.ceil(padded[1] / s)) for s in adapter.strides]
    assert all(m.shape[:2] == (2, model.hidden_dim) for m in maps)


def _count_decodes(model):
    calls = []
    decode = model.transformer.decode

    def spy(encoded, queries):
        calls.append(queries)
        return decode(encoded, queries)

    model.transformer.decode = spy
    return calls


def test_positive_queries_reach_the_decoder_in_training_only():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    calls = _count_decodes(model)
    losses = model(_inputs())
    assert len(calls) == 2  # the detector's queries, then every auxiliary head's group in one pass
    groups = calls[1].query_groups
    assert list(groups) == ["_pos0", "_pos1"] and calls[1].query_pos is None  # DINO: dynamic positions
    mask = calls[1].self_attn_mask  # block diagonal: the groups do not see each other
    a, b = groups["_pos0"], groups["_pos1"]
    assert not mask[a, a].any() and not mask[b, b].any() and mask[a, b].all() and mask[b, a].all()
    for i in range(2):
        assert {f"loss_{t}_pos{i}" for t in ("class", "bbox", "giou")} <= set(losses)
        assert {f"loss_{t}_pos{i}_aux0" for t in ("class", "bbox", "giou")} <= set(losses)
    aux_terms = {"loss_rpn_cls", "loss_rpn_loc", "loss_rcnn_cls", "loss_rcnn_bbox", "loss_atss_cls",
                 "loss_atss_bbox", "loss_atss_centerness"}
    assert aux_terms <= set(losses)
    # the positive-query losses train the shared decoder and the encoder through the memory
    # (class terms: the box heads' last layers start at zero, so box terms reach the layers later)
    model.zero_grad()
    losses["loss_class_pos1"].backward()
    assert model.transformer.decoder.layers[0].cross_attn.attn.value_proj.weight.grad.abs().sum() > 0
    assert model.transformer.encoder.layers[0].ffn.linear1.weight.grad.abs().sum() > 0

    model.eval()
    calls.clear()
    with torch.no_grad():
        out = model(_inputs())
    assert len(calls) == 1 and set(calls[0].query_groups) == {"one2one"}
    assert "instances" in out[0]


def test_eval_outputs_are_bit_identical_with_and_without_co_detr():
    """The heads never run in eval: with the detector's own post-processing the detections are
    bit-identical to the plain detector's; with the official one ("mmdet", Co-DINO's soft-NMS)
    they are mmdet_detections of the plain detector's last-layer scores and boxes."""
    from maskfrozen.modeling.co_detr.postprocess import SoftNMSConfig, mmdet_detections

    torch.manual_seed(0)
    co = build_model(tiny_cfg("MODEL.CO_DETR.TEST.POSTPROCESS", "detector")).eval()
    plain = build_model(tiny_cfg("MODEL.CO_DETR.ENABLED", "False")).eval()
    official = build_model(tiny_cfg()).eval()
    assert plain.co_detr is None
    detector_state = {k: v for k, v in co.state_dict().items() if not k.startswith("co_detr.")}
    plain.load_state_dict(detector_state, strict=True)
    official.load_state_dict(co.state_dict(), strict=True)
    inference_params = sum(p.numel() for n, p in co.named_parameters() if not n.startswith("co_detr."))
    assert inference_params == sum(p.numel() for p in plain.parameters())
    inputs = _inputs(((64, 64), (48, 64)))
    with torch.no_grad():
        a, b, c = co(inputs), plain(inputs), official(inputs)
        out = plain.detect(plain.preprocess_image(inputs)).transformer
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)
    for i, (result, x) in enumerate(zip(c, inputs)):
        size = tuple(x["image"].shape[-2:])
        expected = mmdet_detections(out.final_scores[i], out.final_boxes[i], size, (x["height"], x["width"]),
                                    official.test_topk, SoftNMSConfig(0.8, 0.5, 1e-3, "linear"))
        assert torch.equal(result["instances"].pred_boxes.tensor, expected.pred_boxes.tensor)
        assert torch.equal(result["instances"].scores, expected.scores)


def test_unknown_or_repeated_aux_head_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        build_model(tiny_cfg("MODEL.CO_DETR.AUX_HEADS", "['yolo']"))
    message = str(err.value)
    assert "MODEL.CO_DETR.AUX_HEADS" in message and "unknown" in message and "'yolo'" in message
    assert "registered heads: atss, faster_rcnn" in message
    with pytest.raises(ValueError, match=r"\['atss'\] listed more than once"):
        build_model(tiny_cfg("MODEL.CO_DETR.AUX_HEADS", "['atss', 'atss']"))


def _names_in(tree) -> set:
    """Imported modules, names, attributes, keyword / argument names and non-docstring
    string constants of a module's AST (docstrings are prose)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
        n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body and isinstance(
        n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update([node.module or ""] + [a.name for a in node.names])
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.keyword, ast.arg)):
            names.add(node.arg or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
    return names


def test_detr_package_never_names_co_detr():
    """The arrow points from Co-DETR to the detector: every module of maskfrozen.modeling.detr
    imports and names nothing of co_detr; Co-DETR reaches the detector through the DETR
    extension registry, and a training step reaches it only through that registry."""
    import importlib
    import pkgutil

    import maskfrozen.modeling.detr as detr_pkg
    from maskfrozen.modeling.detr.extensions import DETR_EXTENSIONS

    modules = [detr_pkg] + [importlib.import_module(f"{detr_pkg.__name__}.{m.name}")
                            for m in pkgutil.iter_modules(detr_pkg.__path__)]
    assert len(modules) >= 7 and any(m.__name__.endswith(".meta_arch") for m in modules)
    for module in modules:
        names = _names_in(ast.parse(open(module.__file__).read()))
        offending = sorted(n for n in names if re.search(r"co_?detr", n, re.IGNORECASE))
        assert not offending, f"{module.__file__} names {offending}"
    assert DETR_EXTENSIONS["co_detr"].__module__ == "maskfrozen.modeling.co_detr.co_detr"


def test_a_registered_detr_extension_is_built_held_and_called_in_training_only(monkeypatch):
    """The hook itself, with a toy extension: built from the config with the level strides,
    held under its name, its losses added in training, never called in eval."""
    from maskfrozen.modeling.detr import extensions

    calls = []

    class Toy(torch.nn.Module):
        def __init__(self, strides):
            super().__init__()
            self.strides, self.weight = strides, torch.nn.Parameter(torch.ones(()))

        def forward(self, detector, detected, targets):
            calls.append(len(targets))
            return {"loss_toy": self.weight * 2.0}, []

    monkeypatch.setitem(extensions.DETR_EXTENSIONS, "toy", lambda cfg, strides: Toy(strides))
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.CO_DETR.ENABLED", "False"))
    assert model.co_detr is None and model.toy.strides == model.level_strides
    assert "toy.weight" in model.state_dict()
    losses = model(_inputs())
    assert losses["loss_toy"].item() == 2.0 and calls == [2]
    model.eval()
    with torch.no_grad():
        model(_inputs())
    assert calls == [2]
    with pytest.raises(ValueError, match="'backbone' clashes"):
        monkeypatch.setitem(extensions.DETR_EXTENSIONS, "backbone", lambda cfg, strides: None)
        build_model(tiny_cfg())


K_VARIANTS = {
    "K0": ["MODEL.CO_DETR.AUX_HEADS", "[]"],
    "K1_atss": ["MODEL.CO_DETR.AUX_HEADS", "['atss']"],
    "K1_rcnn": ["MODEL.CO_DETR.AUX_HEADS", "['faster_rcnn']"],
    "K2": [],
    # Co-Deformable-DETR++ style: static query positions, feature term, no denoising
    "K2_static_features": ["MODEL.DETR.DN_NUMBER", "0", "MODEL.DETR.QUERY_POS", "static",
                           "MODEL.CO_DETR.QUERY_FEATURES", "True"],
}


@pytest.mark.parametrize("variant", sorted(K_VARIANTS))
def test_each_k_trains_a_step_with_finite_losses(variant):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*K_VARIANTS[variant]))
    num_heads = {"K0": 0, "K1_atss": 1, "K1_rcnn": 1}.get(variant, 2)
    assert (model.co_detr is None) == (num_heads == 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage():
        losses = model(_inputs())
    assert all(torch.isfinite(v).all() for v in losses.values()), {k: float(v) for k, v in losses.items()}
    assert sum(f"loss_class_pos{i}" in losses for i in range(2)) == num_heads
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("co_detr.") for n in changed) == (num_heads > 0)


def test_rcnn_positives_are_assigned_to_their_gt():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.CO_DETR.AUX_HEADS", "['faster_rcnn']"))
    inputs = _inputs(((64, 64), (48, 64)))
    images = model.preprocess_image(inputs)
    targets = model.prepare_targets(inputs, images.image_sizes)
    detected = model.detect(images, targets)
    head = model.co_detr.heads[0]
    features = model.co_detr.adapter(detected.transformer)
    from detectron2.structures import Boxes, Instances
    gts = []
    for x in inputs:
        inst = Instances((x["height"], x["width"]))
        inst.gt_boxes, inst.gt_classes = Boxes(x["instances"].gt_boxes.tensor.clone()), x["instances"].gt_classes
        gts.append(inst)
    with EventStorage():
        losses, positives = head(images, features, gts)
    assert all(torch.isfinite(v) for v in losses.values())
    for p, gt in zip(positives, gts):
        assert len(p.gt_index) >= len(gt)  # the GT boxes themselves are proposals (append_gt)
        iou = box_iou(p.boxes, gt.gt_boxes.tensor)[torch.arange(len(p.boxes)), p.gt_index]
        assert (iou >= 0.5 - 1e-6).all()
        assert p.features.shape == (len(p.gt_index), model.hidden_dim)


def test_positive_batching_caps_normalises_and_masks_padding():
    c = 8
    boxes = torch.tensor([[0.0, 0.0, 32.0, 16.0], [16.0, 16.0, 80.0, 48.0], [4.0, 4.0, 8.0, 8.0]])
    positives = [AuxPositives(boxes, torch.tensor([2, 0, 1]), torch.randn(3, c)),
                 AuxPositives(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, c))]
    ours = dict(min_queries=0, pad_with_negatives=False, clip_boxes=True)  # the paper's description
    q = batch_positives(positives, [(32, 64), (64, 64)], max_positives=5, channels=c, **ours)
    assert q.boxes.shape == (2, 3, 4) and q.num_positives == 3
    # (x0, y0, x1, y1) / (w, h, w, h), clipped to the image, as cxcywh
    assert torch.allclose(q.boxes[0, 1], torch.tensor([(0.25 + 1.0) / 2, (0.5 + 1.0) / 2, 0.75, 0.5]))
    assert q.padded.tolist() == [[False] * 3, [True] * 3]
    assert [i.tolist() for i in q.indices[0]] == [[0, 1, 2], [2, 0, 1]] and len(q.indices[1][0]) == 0
    capped = batch_positives(positives, [(32, 64), (64, 64)], max_positives=2, channels=c, **ours)
    assert capped.boxes.shape[1] == 2 and capped.num_positives == 2
    # a padded slot's logit adds exactly 0 to the focal loss and gets no gradient
    logit = torch.tensor([PADDED_LOGIT], requires_grad=True)
    loss = sigmoid_focal_loss(logit, torch.zeros(1), reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and logit.grad.abs().item() == 0.0


def test_official_positive_groups_have_at_least_9_slots_filled_with_negatives():
    """mmdet's get_aux_targets: P = max(9, min(300, largest positive count)); an image's short
    group is filled with random negatives of the head (unclipped boxes / the image size), which
    are unmatched slots (background in the class loss, no box loss), not padding."""
    c = 4
    boxes = torch.tensor([[0.0, 0.0, 32.0, 16.0], [16.0, 16.0, 80.0, 48.0], [4.0, 4.0, 8.0, 8.0]])
    negatives = torch.tensor([[float(i), 0.0, i + 10.0, 10.0] for i in range(20)])
    positives = [AuxPositives(boxes, torch.tensor([2, 0, 1]), torch.randn(3, c), negatives, torch.randn(20, c)),
                 AuxPositives(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, c),
                              negatives[:5], torch.randn(5, c))]
    torch.manual_seed(0)
    q = batch_positives(positives, [(32, 64), (64, 64)], max_positives=300, channels=c)
    assert q.boxes.shape == (2, 9, 4) and q.num_positives == 3
    assert [i.tolist() for i in q.indices[0]] == [[0, 1, 2], [2, 0, 1]] and len(q.indices[1][0]) == 0
    # not clipped: [16, 16, 80, 48] / (64, 32, 64, 32) = [.25, .5, 1.25, 1.5] -> cxcywh (.75, 1, 1, 1)
    assert torch.allclose(q.boxes[0, 1], torch.tensor([0.75, 1.0, 1.0, 1.0]))
    # image 0: 6 distinct negatives after its positives; image 1: its 5 negatives, 4 padded slots
    filled = q.boxes[0, 3:] * torch.tensor([64.0, 32.0, 64.0, 32.0])
    starts = sorted(round(float(b[0] - b[2] / 2)) for b in filled)
    assert len(set(starts)) == 6 and all(0 <= x < 20 for x in starts)
    assert q.padded.tolist() == [[False] * 9, [False] * 5 + [True] * 4]


def test_one_decoder_pass_equals_one_pass_per_group_and_padding_is_inert():
    """The groups' single masked pass computes what separate passes compute; a padded slot
    (masked key, logit -1e4) changes nothing for the real queries of its image, and a group
    without positives in an image (slots left visible to each other) stays finite."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    inputs = _inputs()
    with torch.no_grad():
        encoded = model.detect(model.preprocess_image(inputs)).transformer
        c, sizes = model.hidden_dim, [(64, 64), (48, 64)]
        g = torch.Generator().manual_seed(1)

        def aux(n):
            xy = torch.rand(n, 2, generator=g) * 30
            return AuxPositives(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1),
                                torch.randint(0, 2, (n,), generator=g), torch.randn(n, c, generator=g))

        g0 = batch_positives([aux(4), aux(2)], sizes, 300, c)
        g1 = batch_positives([aux(3), aux(0)], sizes, 300, c)
        emb = model.co_detr.query_embeddings
        joint = positive_query_sets(model, encoded, [g0, g1], emb, 1.0, 4)
        alone0 = positive_query_sets(model, encoded, [g0], emb[:1], 1.0, 4)[0]
        alone1 = positive_query_sets(model, encoded, [g1], emb[1:], 1.0, 4)[0]
        for j, alone in ((joint[0], alone0), (joint[1], alone1)):
            for key in ("pred_logits", "pred_boxes"):
                assert torch.allclose(j.outputs[key], alone.outputs[key], atol=1e-5)
        assert torch.isfinite(joint[1].outputs["pred_boxes"]).all()
        assert (joint[0].outputs["pred_logits"][1, 2:] == PADDED_LOGIT).all()  # image 1: 2 positives of 4 slots
        # without the padded slots: the real queries of image 1 compute the same
        trimmed = batch_positives([aux(0), aux(0)], sizes, 300, c)
        trimmed.boxes, trimmed.features = g0.boxes[1:, :2], g0.features[1:, :2]
        trimmed.padded = torch.zeros(1, 2, dtype=torch.bool)
        trimmed.indices = g0.indices[1:]
        encoded_1 = type(encoded)(**{k: (v[1:] if torch.is_tensor(v) and v.shape[0] == 2 and k not in (
            "spatial_shapes", "level_start_index") else v) for k, v in vars(encoded).items()})
        one = positive_query_sets(model, encoded_1, [trimmed], emb[:1], 1.0, 4)[0]
        assert torch.allclose(one.outputs["pred_boxes"][0], alone0.outputs["pred_boxes"][1, :2], atol=1e-5)


# ----------------------------------------------------------------------------- configs
def _load(*parts, opts=()):
    return load_config(os.path.join(REPO, "configs", *parts), opts, freeze=False)


def test_configs_code_defaults_and_shapes_recipes():
    from detectron2.config import get_cfg

    from maskfrozen.config import add_maskfrozen_config

    defaults = get_cfg()
    add_maskfrozen_config(defaults)
    assert defaults.MODEL.CO_DETR.ENABLED is False  # off by default
    co_dino = _load("coco", "co_detr", "co_dino_R50_5scale_12ep.yaml")
    for key, value in defaults.MODEL.CO_DETR.items():  # code defaults = the COCO Co-DINO yaml
        if key != "ENABLED":
            assert co_dino.MODEL.CO_DETR[key] == value, key
    assert co_dino.MODEL.DETR.NUM_FEATURE_LEVELS == 5 and co_dino.MODEL.DETR.NUM_QUERIES == 900
    co_deform = _load("coco", "co_detr", "co_deformable_detr_R50_12ep.yaml")
    assert co_deform.MODEL.DETR.QUERY_POS == "static" and co_deform.MODEL.CO_DETR.QUERY_FEATURES
    # the shapes Co-DINO is the shapes DINO recipe + Co-DETR
    dino, co = _load("shapes", "detr", "dino_R18.yaml"), _load("shapes", "co_detr", "co_dino_R18.yaml")
    assert co.MODEL.DETR == dino.MODEL.DETR and co.SOLVER == dino.SOLVER and co.MODEL.CO_DETR.ENABLED
    # Mask Frozen-DETR on it: the detector of co_dino_R18.yaml, the mask network of the DINO one
    mf_co, mf_dino = _load("shapes", "mask_frozen_detr", "co_dino_R18.yaml"), _load("shapes", "mask_frozen_detr",
                                                                                    "dino_R18.yaml")
    assert mf_co.MODEL.CO_DETR == co.MODEL.CO_DETR and mf_co.MODEL.DETR == co.MODEL.DETR
    # key by key: the Mask Frozen-DETR DINO recipe with the Co-DINO's CO_DETR keys, its own weights and folder
    expected = mf_dino.clone()
    expected.MODEL.CO_DETR = co.MODEL.CO_DETR.clone()
    expected.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS = "output/shapes/co_dino_R18/model_final.pth"
    expected.OUTPUT_DIR = "output/shapes/mask_frozen_co_dino_R18"
    assert mf_co == expected
    mf_co.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS = ""
    mf_co.MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR = True
    model = build_model(mf_co)  # the frozen detector carries the (unused) Co-DETR heads of the checkpoint
    assert any(n.startswith("detector.co_detr.") for n, _ in model.named_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("detector."))


def test_a_co_detr_change_in_the_detector_recipe_reaches_the_mask_frozen_recipe(tmp_path):
    """configs/shapes/mask_frozen_detr/co_dino_R18.yaml inherits (not repeats) the Co-DINO's
    MODEL.CO_DETR keys: edit one in a copy of the shapes configs, both recipes see it."""
    shutil.copytree(os.path.join(REPO, "configs", "shapes"), tmp_path / "shapes")
    detector_yaml = tmp_path / "shapes" / "co_detr" / "co_dino_R18.yaml"
    text = detector_yaml.read_text()
    assert text.count("MAX_POSITIVES: 300") == 1
    detector_yaml.write_text(text.replace("MAX_POSITIVES: 300", "MAX_POSITIVES: 123"))
    mask_frozen = load_config(str(tmp_path / "shapes" / "mask_frozen_detr" / "co_dino_R18.yaml"))
    assert mask_frozen.MODEL.CO_DETR.MAX_POSITIVES == 123
    assert mask_frozen.MODEL.META_ARCHITECTURE == "MaskFrozenDETR"


@pytest.mark.parametrize("name", ["co_dino_R50_5scale_12ep.yaml", "co_deformable_detr_R50_12ep.yaml"])
def test_coco_configs_build_and_train_a_step(name):
    """The COCO configs at a small input (the published model, random weights)."""
    small = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_QUERIES", "30"]
    cfg = _load("coco", "co_detr", name, opts=small + (["MODEL.DETR.DN_NUMBER", "4"] if "dino" in name else []))
    torch.manual_seed(0)
    model = build_model(cfg)
    with EventStorage():
        losses = model(_inputs(((64, 64), (48, 64))))
    assert all(torch.isfinite(v) for v in losses.values())
    assert "loss_class_pos1" in losses and "loss_rcnn_bbox" in losses


# ----------------------------------------------------------------------------- converter
def co_dino_public_state_dict(cfg, model):
    """Public Co-DINO (mmdet) names for the config's sizes, written out here from the mmdet
    module definitions (the backbone and neck named from ours by torchvision's scheme)."""
    d, c = cfg.MODEL.DETR, cfg.MODEL.DETR.HIDDEN_DIM
    ff, lv, h, pts, k = d.DIM_FEEDFORWARD, d.NUM_FEATURE_LEVELS, d.NHEADS, d.ENC_N_POINTS, d.NUM_CLASSES
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(s, generator=g)  # noqa: E731
    sd = {}
    for key, v in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        m = re.match(r"backbone\.res(\d)\.(\d+)\.(conv\d|shortcut)(\.norm)?\.(weight|bias|running_mean|running_var)$", key)
        if m:
            stage, block, module, norm, param = m.groups()
            if module == "shortcut":
                name = "downsample.1" if norm else "downsample.0"
            else:
                name = f"bn{module[-1]}" if norm else module
            sd[f"backbone.layer{int(stage) - 1}.{block}.{name}.{param}"] = r(*v.shape)
        elif key.startswith("backbone.stem.conv1"):
            sd[key.replace("backbone.stem.conv1.norm", "backbone.bn1").replace("backbone.stem.conv1", "backbone.conv1")] = r(*v.shape)
        elif re.match(r"neck\.(convs|extra_convs)\.\d+\.conv\.weight$", key):
            sd[key] = r(*v.shape)
        elif re.match(r"neck\..*\.norm\.", key):
            sd[key.replace(".norm.", ".gn.")] = r(*v.shape)
    q = "query_head.transformer."
    sd[q + "level_embeds"] = r(lv, c)
    sd[q + "query_embed.weight"] = r(d.NUM_QUERIES, c)
    sd[q + "enc_output.weight"], sd[q + "enc_output.bias"] = r(c, c), r(c)
    sd[q + "enc_output_norm.weight"], sd[q + "enc_output_norm.bias"] = r(c), r(c)

    def msda(p):
        sd[p + "sampling_offsets.weight"], sd[p + "sampling_offsets.bias"] = r(h * lv * pts * 2, c), r(h * lv * pts * 2)
        sd[p + "attention_weights.weight"], sd[p + "attention_weights.bias"] = r(h * lv * pts, c), r(h * lv * pts)
        for n in ("value_proj", "output_proj"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(c, c), r(c)

    def ffn_norms(p, n_norms):
        sd[p + "ffns.0.layers.0.0.weight"], sd[p + "ffns.0.layers.0.0.bias"] = r(ff, c), r(ff)
        sd[p + "ffns.0.layers.1.weight"], sd[p + "ffns.0.layers.1.bias"] = r(c, ff), r(c)
        for i in range(n_norms):
            sd[p + f"norms.{i}.weight"], sd[p + f"norms.{i}.bias"] = r(c), r(c)

    for i in range(d.ENC_LAYERS):
        msda(q + f"encoder.layers.{i}.attentions.0.")
        ffn_norms(q + f"encoder.layers.{i}.", 2)
    for i in range(d.DEC_LAYERS):
        p = q + f"decoder.layers.{i}."
        sd[p + "attentions.0.attn.in_proj_weight"], sd[p + "attentions.0.attn.in_proj_bias"] = r(3 * c, c), r(3 * c)
        sd[p + "attentions.0.attn.out_proj.weight"], sd[p + "attentions.0.attn.out_proj.bias"] = r(c, c), r(c)
        msda(p + "attentions.1.")
        ffn_norms(p, 3)
    sd[q + "decoder.ref_point_head.0.weight"], sd[q + "decoder.ref_point_head.0.bias"] = r(c, 2 * c), r(c)
    sd[q + "decoder.ref_point_head.2.weight"], sd[q + "decoder.ref_point_head.2.bias"] = r(c, c), r(c)
    sd[q + "decoder.norm.weight"], sd[q + "decoder.norm.bias"] = r(c), r(c)
    for i in range(2):  # positive queries: 0 = R-CNN, 1 = ATSS (Co-DINO: with_coord_feat=False)
        sd[q + f"aux_pos_trans.{i}.weight"], sd[q + f"aux_pos_trans.{i}.bias"] = r(c, 2 * c), r(c)
        sd[q + f"aux_pos_trans_norm.{i}.weight"], sd[q + f"aux_pos_trans_norm.{i}.bias"] = r(c), r(c)
    for i in range(d.DEC_LAYERS + 1):
        sd[f"query_head.cls_branches.{i}.weight"], sd[f"query_head.cls_branches.{i}.bias"] = r(k, c), r(k)
        for j, out in ((0, c), (2, c), (4, 4)):
            sd[f"query_head.reg_branches.{i}.{j}.weight"], sd[f"query_head.reg_branches.{i}.{j}.bias"] = r(out, c), r(out)
    sd["query_head.label_embedding.weight"] = r(k, c)
    sd["query_head.downsample.0.weight"], sd["query_head.downsample.0.bias"] = r(c, c, 3, 3), r(c)
    sd["query_head.downsample.1.weight"], sd["query_head.downsample.1.bias"] = r(c), r(c)
    fc, pool = cfg.MODEL.CO_DETR.ROI_HEAD.FC_DIM, cfg.MODEL.CO_DETR.ROI_HEAD.POOLER_RESOLUTION
    sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"] = r(c, c, 3, 3), r(c)
    sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"] = r(9, c, 1, 1), r(9)
    sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"] = r(36, c, 1, 1), r(36)
    b = "roi_head.0.bbox_head."
    sd[b + "shared_fcs.0.weight"], sd[b + "shared_fcs.0.bias"] = r(fc, c * pool * pool), r(fc)
    sd[b + "shared_fcs.1.weight"], sd[b + "shared_fcs.1.bias"] = r(fc, fc), r(fc)
    sd[b + "fc_cls.weight"], sd[b + "fc_cls.bias"] = r(k + 1, fc), r(k + 1)
    sd[b + "fc_reg.weight"], sd[b + "fc_reg.bias"] = r(4 * k, fc), r(4 * k)
    a = "bbox_head.0."
    for branch in ("cls_convs", "reg_convs"):
        sd[a + f"{branch}.0.conv.weight"] = r(c, c, 3, 3)
        sd[a + f"{branch}.0.gn.weight"], sd[a + f"{branch}.0.gn.bias"] = r(c), r(c)
    for name, out in (("atss_cls", k), ("atss_reg", 4), ("atss_centerness", 1)):
        sd[a + f"{name}.weight"], sd[a + f"{name}.bias"] = r(out, c, 3, 3), r(out)
    for i in range(lv + 1):
        sd[a + f"scales.{i}.scale"] = r()
    return sd


def test_converter_round_trip_on_a_synthetic_co_dino_checkpoint():
    cfg = tiny_cfg()
    model = build_model(cfg)
    source = co_dino_public_state_dict(cfg, model)
    converted, report = convert_co_detr_state_dict(source, model.state_dict(), aux_heads=cfg.MODEL.CO_DETR.AUX_HEADS)
    assert not report.unused_source_keys and not report.dropped_aux
    assert report.unmatched_target_keys == [], report.unmatched_target_keys
    assert len(report.renamed) == len(source) and sorted(report.zero_filled) == sorted(
        k for k in model.state_dict() if re.match(r"neck\..*\.conv\.bias$", k))
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    for src, dst in report.renamed.items():
        if src.startswith("rpn_head.rpn_cls") or src.startswith("rpn_head.rpn_reg"):
            assert torch.equal(state[dst], permute_rpn_anchors(source[src], 3, 3))
        else:
            assert torch.equal(state[dst], source[src]), (src, dst)
    assert report.renamed["query_head.transformer.aux_pos_trans.0.weight"] == "co_detr.query_embeddings.0.pos_proj.weight"
    assert report.renamed["bbox_head.0.atss_cls.weight"] == "co_detr.heads.1.atss_cls.weight"

    # K=1 (ATSS only, head index 0): the R-CNN tensors are dropped, ATSS's renumbered
    cfg1 = tiny_cfg("MODEL.CO_DETR.AUX_HEADS", "['atss']")
    model1 = build_model(cfg1)
    converted1, report1 = convert_co_detr_state_dict(source, model1.state_dict(), aux_heads=["atss"])
    assert report1.unmatched_target_keys == [] and report1.dropped_aux
    assert all(k.startswith(("rpn_head", "roi_head", "query_head.transformer.aux_pos_trans")) for k in report1.dropped_aux)
    assert report1.renamed["query_head.transformer.aux_pos_trans.1.weight"] == "co_detr.query_embeddings.0.pos_proj.weight"
    model1.load_state_dict(converted1, strict=True)

    # the detector alone (a plain DINO of the same shape)
    plain = build_model(tiny_cfg("MODEL.CO_DETR.ENABLED", "False"))
    converted0, report0 = convert_co_detr_state_dict(source, plain.state_dict(), include_aux_heads=False)
    assert report0.unmatched_target_keys == [] and not report0.unused_source_keys
    plain.load_state_dict(converted0, strict=True)

    bad = dict(source)
    bad["query_head.cls_branches.0.weight"] = torch.zeros(3, cfg.MODEL.DETR.HIDDEN_DIM)
    with pytest.raises(ValueError, match="cls_branches.0.weight"):
        convert_co_detr_state_dict(bad, model.state_dict())


def test_convert_checkpoint_cli_co_detr_format(tmp_path):
    """tools/convert_checkpoint.py --format co_detr writes a checkpoint that loads strictly."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    cfg = tiny_cfg()
    model = build_model(cfg)
    source_path, out = tmp_path / "co_dino.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": co_dino_public_state_dict(cfg, model)}, source_path)
    report = convert_checkpoint.main(["--format", "co_detr", "--config-file", TINY, str(source_path), str(out)])
    assert report.unmatched_target_keys == []
    model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)


# ----------------------------------------------------------------------------- DDP
def _train_one_step(output_dir):
    from detectron2.utils import comm

    from conftest import make_cfg
    from maskfrozen.engine import Trainer

    torch.set_num_threads(1)
    cfg = make_cfg(TINY, output_dir, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1000",
                   "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {k: v.clone() for k, v in trainer.model.module.state_dict().items()}
    trainer.train()
    torch.save({"initial": initial, "final": trainer.model.module.state_dict(), "world": comm.get_world_size()},
               os.path.join(output_dir, f"rank{comm.get_rank()}.pt"))


def test_ddp_gloo_replicas_stay_identical_with_aux_heads(tmp_path):
    from maskfrozen.engine import launch

    launch(_train_one_step, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    weights = [k for k, v in r0["final"].items() if v.dtype.is_floating_point and "running" not in k]
    assert any(k.startswith("co_detr.heads.") for k in weights)
    for key in weights:
        assert torch.equal(r0["initial"][key], r1["initial"][key]), key
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    changed = [k for k in weights if not torch.equal(r0["initial"][k], r0["final"][k])]
    assert any(k.startswith("co_detr.heads.") for k in changed) and any(k.startswith("transformer.") for k in changed)


# ----------------------------------------------------------------------------- CPU fast paths
# The Faster R-CNN head's drop-in subclasses (maskfrozen/modeling/co_detr/roi_align.py, rpn.py)
# against the detectron2 modules they replace, and the fused 1x1 / 3x3 output convs of the RPN
# and ATSS heads against the separate convs.
def _pooler_case(dtype, empty_second_image=False):
    """Features of a 256 x 192 batch of 2 on strides 8 / 16 / 32 and boxes for every level
    (canonical box 56 on level 3: sides < 112 -> p0, < 224 -> p1, else p2), with boxes on the
    image borders, partly and wholly outside the image and a zero-width one."""
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 3, 256 // s, 192 // s, generator=g, dtype=dtype, requires_grad=True)
                for s in (8, 16, 32)]
    fixed = torch.tensor([
        [0.0, 0.0, 40.0, 30.0],  # top-left corner
        [150.0, 200.0, 192.0, 256.0],  # bottom-right corner, ending exactly on the border
        [-30.0, 100.0, 20.0, 140.0],  # partly left of the image
        [170.0, -25.0, 230.0, 35.0],  # partly outside on two sides
        [-80.0, -70.0, -40.0, -20.0],  # wholly outside: its samples are dropped
        [60.0, 60.0, 60.0, 90.0],  # zero width
        [10.0, 20.0, 150.0, 160.0],  # level 1
        [-20.0, 30.0, 170.0, 200.0],  # level 1, partly outside
        [0.0, 0.0, 192.0, 256.0],  # level 1: the whole image
        [-16.0, 0.0, 208.0, 256.0],  # level 2, over the left and right borders
        [-60.0, -40.0, 250.0, 300.0],  # level 2, beyond every border
    ], dtype=dtype)
    xy = torch.rand(20, 2, generator=g, dtype=dtype) * 230 - 20
    wh = torch.rand(20, 2, generator=g, dtype=dtype) ** 2 * 240 + 1
    second = torch.cat([xy, xy + wh], 1)
    return features, [Boxes(fixed), Boxes(second[:0] if empty_second_image else second)]


def _pooler_args(sampling_ratio):
    return dict(output_size=(7, 7), scales=[1 / 8, 1 / 16, 1 / 32], sampling_ratio=sampling_ratio,
                pooler_type="ROIAlignV2", canonical_box_size=56, canonical_level=3)


@pytest.mark.parametrize("sampling_ratio,empty_second_image", [(2, False), (2, True), (1, False)])
def test_sparse_grad_pooler_equals_detectron2_pooler(sampling_ratio, empty_second_image):
    """SparseGradROIPooler's forward is bit-identical to detectron2's ROIPooler and its input
    gradients equal torchvision's RoIAlign backward (float64: same sums in another order);
    sampling ratio 2 as in the shapes configs, 1 as a second case."""
    from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels

    from maskfrozen.modeling.co_detr.roi_align import SparseGradROIPooler

    args = _pooler_args(sampling_ratio)
    reference, fast = ROIPooler(**args), SparseGradROIPooler(**args)
    features, boxes = _pooler_case(torch.float64, empty_second_image)
    levels = assign_boxes_to_levels(boxes, 3, 5, 56, 3)
    assert levels.bincount(minlength=3).min() >= 2  # every level pools several boxes
    expected, pooled = reference(features, boxes), fast(features, boxes)
    assert type(pooled.grad_fn).__name__ == "_MultiLevelROIAlignBackward"  # the fast path ran
    assert torch.equal(pooled, expected)
    assert (expected[4] == 0).all() and expected.abs().sum() > 0  # the box outside pools zeros
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad(expected, features, upstream)
    got = torch.autograd.grad(pooled, features, upstream)
    for w, g in zip(want, got):
        assert w.abs().max() > 0.1  # every level receives gradient
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if empty_second_image:
        assert all((g[1] == 0).all() for g in got)

    # float32: the forward is still bit-identical; the gradients differ by float rounding only
    features, boxes = _pooler_case(torch.float32, empty_second_image)
    expected, pooled = reference(features, boxes), fast(features, boxes)
    assert torch.equal(pooled, expected)
    for w, g in zip(torch.autograd.grad(expected, features, upstream.float()),
                    torch.autograd.grad(pooled, features, upstream.float())):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # without gradients (and for adaptive sampling) detectron2's pooler runs unchanged
    with torch.no_grad():
        assert torch.equal(fast(features, boxes), expected)
    adaptive = SparseGradROIPooler(**_pooler_args(0))
    assert torch.equal(adaptive(features, boxes), ROIPooler(**_pooler_args(0))(features, boxes))


def _rpn_pair(post_nms_topk=100):
    """The Faster R-CNN head's TruncatedNMSRPN (FusedRPNHead) on strides 8 / 16 / 32 (9
    anchors per cell), and a copy of it turned back into detectron2's RPN / StandardRPNHead
    (same arguments and weights)."""
    import copy

    from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead

    from maskfrozen.modeling.co_detr.rcnn import FasterRCNNAuxHead
    from maskfrozen.modeling.co_detr.rpn import FusedRPNHead, TruncatedNMSRPN

    torch.manual_seed(0)
    head = FasterRCNNAuxHead(8, 3, [8, 16, 32], num_roi_levels=3, rpn_pre_nms_topk=1000,
                             rpn_post_nms_topk=post_nms_topk, pooler_sampling_ratio=2, fc_dim=16)
    fast = head.rpn.train()
    assert type(fast) is TruncatedNMSRPN and type(fast.rpn_head) is FusedRPNHead
    reference = copy.deepcopy(fast)
    reference.__class__, reference.rpn_head.__class__ = RPN, StandardRPNHead
    return fast, reference


def _spy_rpn_nms(monkeypatch):
    """Record the sizes TruncatedNMSRPN's prefix NMS runs on and its full (fallback) NMS calls."""
    import maskfrozen.modeling.co_detr.rpn as rpn_module

    calls = {"prefix": [], "full": 0}
    nms, batched_nms = rpn_module.nms, rpn_module.batched_nms

    def prefix(boxes, *args):
        calls["prefix"].append(len(boxes))
        return nms(boxes, *args)

    def full(*args):
        calls["full"] += 1
        return batched_nms(*args)

    monkeypatch.setattr(rpn_module, "nms", prefix)
    monkeypatch.setattr(rpn_module, "batched_nms", full)
    return calls


def _same_proposals(a, b):
    return all(torch.equal(x.proposal_boxes.tensor, y.proposal_boxes.tensor)
               and torch.equal(x.objectness_logits, y.objectness_logits) and x.image_size == y.image_size
               for x, y in zip(a, b)) and len(a) == len(b)


def test_truncated_nms_rpn_training_proposals_equal_detectron2(monkeypatch):
    """A training forward: the proposals (boxes, logits, order) and losses equal detectron2's
    RPN while the NMS of the two finest levels (1000 and 324 of 1405 anchors per image) stops
    after a prefix of their boxes."""
    from detectron2.structures import ImageList, Instances

    fast, reference = _rpn_pair()
    sizes = [(96, 96), (80, 90)]  # the second image is padded: its proposals get clipped
    images = ImageList(torch.zeros(2, 3, 96, 96), sizes)
    g = torch.Generator().manual_seed(2)
    features = {f"p{i}": torch.randn(2, 8, 96 // s, 96 // s, generator=g) for i, s in enumerate((8, 16, 32))}
    gts = []
    for size, boxes in zip(sizes, ([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 90.0, 70.0]], [[10.0, 10.0, 60.0, 35.0]])):
        inst = Instances(size)
        inst.gt_boxes, inst.gt_classes = Boxes(torch.tensor(boxes)), torch.zeros(len(boxes), dtype=torch.int64)
        gts.append(inst)
    calls = _spy_rpn_nms(monkeypatch)
    # the anchor labelling (padding ignored, as mmdet; tested against the official code in
    # tests/golden/test_co_dino.py) is not what this test is about: the reference uses it too
    from maskfrozen.modeling.co_detr.rpn import TruncatedNMSRPN
    monkeypatch.setattr(reference, "label_and_sample_anchors",
                        lambda anchors, gt: TruncatedNMSRPN.label_and_sample_anchors(fast, anchors, gt))
    with EventStorage():
        torch.manual_seed(3)
        expected, expected_losses = reference(images, features, gts)
        assert calls == {"prefix": [], "full": 0}
        torch.manual_seed(3)
        proposals, losses = fast(images, features, gts)
    # level 0's NMS (1000 boxes per image) stopped after its first 2 x post_nms_topk = 200; no full NMS
    assert calls["full"] == 0 and 200 in calls["prefix"] and 1000 not in calls["prefix"]
    assert [len(p) for p in proposals] == [100, 100]
    assert _same_proposals(proposals, expected)
    assert losses.keys() == expected_losses.keys()
    for key in losses:
        assert torch.equal(losses[key], expected_losses[key]), key
    fast.eval(), reference.eval()  # inference: detectron2's code
    with torch.no_grad():
        assert _same_proposals(fast(images, features)[0], reference(images, features)[0])


@pytest.mark.parametrize("tie", ["quantised", "at_top", "far_below"])
def test_truncated_nms_rpn_tied_logits(monkeypatch, tie):
    """Tied logits at or above the last returned proposal could be ordered differently by the
    final (unstable) ranking: the full NMS runs instead and the proposals are detectron2's;
    a tie far below them keeps the truncated NMS, with the same proposals."""
    fast, reference = _rpn_pair(post_nms_topk=60)
    sizes = [(96, 96), (80, 90)]
    features = [torch.zeros(2, 8, 96 // s, 96 // s) for s in (8, 16, 32)]
    anchors = fast.anchor_generator(features)
    g = torch.Generator().manual_seed(4)
    logits, deltas = [], []
    for a in anchors:
        level = torch.randn(2, len(a), generator=g)
        if tie == "quantised":
            level = (level * 4).round() / 4
        else:  # one logit takes its neighbour's value, near the top or near the bottom of the ranking
            values, order = level.sort(dim=1, descending=True)
            pick = 2 if tie == "at_top" else len(a) - 3
            level.scatter_(1, order[:, pick:pick + 1], values[:, pick - 1:pick])
        logits.append(level)
        deltas.append(torch.randn(2, len(a), 4, generator=g) * 0.2)
    calls = _spy_rpn_nms(monkeypatch)
    expected = reference.predict_proposals(anchors, logits, deltas, sizes)
    proposals = fast.predict_proposals(anchors, logits, deltas, sizes)
    assert _same_proposals(proposals, expected) and [len(p) for p in proposals] == [60, 60]
    assert 120 in calls["prefix"]  # the truncated NMS ran first
    assert calls["full"] == (0 if tie == "far_below" else 2)  # one fallback per image


def test_fused_output_convs_equal_separate_convs_with_the_same_keys():
    """FusedRPNHead and ATSSHead.predict run their output convs as one conv: the outputs are
    those of the separate convs (same weights), and the parameter names are unchanged."""
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead

    from maskfrozen.modeling.co_detr.atss import ATSSHead
    from maskfrozen.modeling.co_detr.rpn import FusedRPNHead

    torch.manual_seed(0)
    fused = FusedRPNHead(in_channels=16, num_anchors=9)
    separate = StandardRPNHead(in_channels=16, num_anchors=9)
    assert list(fused.state_dict()) == list(separate.state_dict()) == [
        "conv.weight", "conv.bias", "objectness_logits.weight", "objectness_logits.bias",
        "anchor_deltas.weight", "anchor_deltas.bias"]
    separate.load_state_dict(fused.state_dict())
    features = [torch.randn(2, 16, s, s + 1) for s in (12, 6, 3)]
    with torch.no_grad():
        for got, want in zip(fused(features), separate(features)):
            for x, y in zip(got, want):
                assert torch.equal(x, y)

    atss = ATSSHead(16, 3, [8, 16, 32], num_groups=4)
    assert {k for k in atss.state_dict() if k.startswith(("atss_", "scales"))} == {
        f"{n}.{p}" for n in ("atss_cls", "atss_reg", "atss_centerness") for p in ("weight", "bias")} | {
        "scales.0", "scales.1", "scales.2"}
    with torch.no_grad():
        for conv in (atss.atss_reg, atss.atss_centerness):  # the init's zero biases would hide a mix-up
            conv.weight.normal_(std=0.1), conv.bias.normal_()
        for i, scale in enumerate(atss.scales):
            scale.fill_(0.5 + i)
        logits, deltas, centerness = atss.predict(features)
        want_logits, want_deltas, want_ctr = [], [], []
        for x, scale in zip(features, atss.scales):
            cls_feat, reg_feat = atss.cls_convs[0](x), atss.reg_convs[0](x)
            want_logits.append(atss.atss_cls(cls_feat).flatten(2).transpose(1, 2))
            want_deltas.append((atss.atss_reg(reg_feat) * scale).flatten(2).transpose(1, 2))
            want_ctr.append(atss.atss_centerness(reg_feat).flatten(1))
    assert torch.equal(logits, torch.cat(want_logits, 1))
    for got, want in ((deltas, torch.cat(want_deltas, 1)), (centerness, torch.cat(want_ctr, 1))):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- soft-NMS
def test_soft_nms_equals_hand_computation():
    """mmcv's linear soft-NMS (the official Co-DINO test_cfg: IoU 0.8, min score 1e-3): A
    [0,0,10,10] .9 kept first; B [0,0,10,8] has IoU 80/100 = .8 >= .8 with A -> .8 x (1 - .8)
    = .16; C far away keeps .7; D (A's twin, .0015) -> x 0 < 1e-3, dropped. Order A, C, B.
    Class-wise: D in another class than A is not decayed by it. (Checked also against mmcv
    1.7.0's compiled softnms on 600 random cases with ties: same indices, scores <= 1.2e-7.)"""
    from maskfrozen.layers.nms import batched_soft_nms, soft_nms

    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.0015], dtype=torch.float64)
    keep, kept = soft_nms(boxes, scores, iou_threshold=0.8, min_score=1e-3)
    assert keep.tolist() == [0, 2, 1]
    assert torch.allclose(kept, torch.tensor([0.9, 0.7, 0.16], dtype=torch.float64))
    keep, kept = batched_soft_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), iou_threshold=0.8, min_score=1e-3)
    assert keep.tolist() == [0, 2, 1, 3] and kept[-1].item() == pytest.approx(0.0015)
    # gaussian: B x exp(-.64 / .5)
    keep, kept = soft_nms(boxes[:2], scores[:2], method="gaussian", sigma=0.5)
    assert kept[1].item() == pytest.approx(0.8 * math.exp(-0.64 / 0.5))
    with pytest.raises(ValueError, match="soft-NMS method 'cubic'"):
        soft_nms(boxes, scores, method="cubic")


def test_quality_focal_loss_equals_hand_computation():
    """mmdet's QualityFocalLoss (beta 2), the official Co-DINO class loss: logits 0 everywhere,
    query 0 matched to a GT of class 1; its box XYXY [0, 0, .4, .2] vs the GT's [0, 0, .4, .4]:
    IoU .5. Negatives: BCE(0, 0) sigmoid(0)^2 = ln2 / 4 each (3 of them), the positive
    BCE(0, .5) |.5 - .5|^2 = 0."""
    from maskfrozen.modeling.criterion.losses import class_loss_quality_focal

    logits = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[0.2, 0.1, 0.4, 0.2], [0.5, 0.5, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.2, 0.4, 0.4]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    loss = class_loss_quality_focal(logits, pred, targets, indices, num_boxes=1.0)
    assert loss.item() == pytest.approx(3 * math.log(2) / 4, rel=1e-6)
    # a perfect box: target 1, BCE(0, 1) |1 - .5|^2 = ln2 / 4 more
    pred[0, 0] = targets[0]["boxes"][0]
    assert class_loss_quality_focal(logits, pred, targets, indices, 1.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_rpn_low_quality_matches_need_min_pos_iou():
    """mmdet's MaxIoUAssigner(min_pos_iou=0.3): a GT whose best anchor has IoU 0.25 gets no
    positive (detectron2's Matcher, min 0, makes it one); one of IoU 0.5 does."""
    from maskfrozen.modeling.co_detr.rpn import FlooredLowQualityMatcher

    iou = torch.tensor([[0.25, 0.1, 0.0], [0.0, 0.5, 0.2]])  # [G, A]
    _, labels = FlooredLowQualityMatcher([0.3, 0.7], [0, -1, 1], 0.3)(iou)
    assert labels.tolist() == [0, 1, 0]  # anchor 1: IoU .5 in [.3, .7) ignored, then GT 1's best
    _, labels = FlooredLowQualityMatcher([0.3, 0.7], [0, -1, 1], 0.0)(iou)
    assert labels.tolist() == [1, 1, 0]
