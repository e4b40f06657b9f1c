"""Golden tests of the DETR family against the official implementations (fixtures written by
tools/golden/official_{deformable_detr,h_detr,dino}.py; see tests/golden/README.md).

Each case holds a reduced official model (hidden dim 32, 91 classes, random weights) in its
official checkpoint format and its outputs on two images of different sizes from fixed
backbone features. The test converts the checkpoint with tools/convert_checkpoint.py (the
user's path), builds the shipped COCO config with the same reductions and a parameter-free
backbone that returns the fixture's features (``GoldenFeatureBackbone``; the ResNet-50
conversion is tested in tests/test_detr_backbone_conversion.py), loads strictly, runs in
float64 (as the official run did) and compares stage by stage: padding masks, position
embeddings, input projections, encoder memory, two-stage proposal scores, boxes and indices,
every decoder layer's logits and boxes, the final ``Instances`` at the output size (through
``forward``, COCOEvaluator's path), and in training every matcher call's indices and every
weighted loss term on one fixed batch (DINO's denoising groups are the official run's).

Float64 is needed: with random weights neighbouring proposal scores lie ~1e-7 apart, below
the float32 noise between two implementations, so float32 runs may swap neighbours in the
two-stage top-k. Intermediate tensors are stored as float32 (tolerance 1e-5 absolute).
"""
import os
from typing import Any, Dict, List

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model
from detectron2.structures import Boxes, Instances

from golden_compare import REPO, assert_trees_close, case, convert_official
from maskfrozen.checkpoint import coco_contiguous_ids
from maskfrozen.config import load_config

CASES = {"deformable_detr": "original", "h_detr": "original", "dino": "original_dino"}
ATOL = 1e-5


# ----------------------------------------------------------------------------- our side
@BACKBONE_REGISTRY.register()
class GoldenFeatureBackbone(Backbone):
    """No parameters: returns ``features`` (set by the test) as res3..res5, with the channels
    of a ResNet whose res2 has ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (x2, x4, x8) at strides 8-32;
    with res2 in ``MODEL.RESNETS.OUT_FEATURES`` also a zero res2 (stride 4) for the heads that
    read it (Mask Frozen-DETR's mask network)."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        c = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
        self.shapes = {f"res{i + 3}": ShapeSpec(channels=c * 2 ** (i + 1), stride=8 * 2 ** i) for i in range(3)}
        self.res2 = ShapeSpec(channels=c, stride=4) if "res2" in cfg.MODEL.RESNETS.OUT_FEATURES else None
        self.features: List[torch.Tensor] = []

    def forward(self, x):
        out = {name: f.to(x.dtype) for name, f in zip(self.shapes, self.features)}
        if self.res2 is not None:
            h, w = ((x.shape[-2] + 1) // 2 + 1) // 2, ((x.shape[-1] + 1) // 2 + 1) // 2
            out["res2"] = x.new_zeros(x.shape[0], self.res2.channels, h, w)
        return out

    def output_shape(self):
        return {**({"res2": self.res2} if self.res2 is not None else {}), **self.shapes}


def golden_opts(meta) -> List[str]:
    return list(meta["maskfrozen_opts"]) + ["MODEL.BACKBONE.NAME", "GoldenFeatureBackbone",
                                            "MODEL.RESNETS.RES2_OUT_CHANNELS", str(meta["backbone_channels"][0] // 2),
                                            "MODEL.DEVICE", "cpu"]


def converted_model(name: str, tmp_path):
    """Our model of the case, converted from the official checkpoint and loaded strictly (float64)."""
    c = case(name)
    meta = c["meta"]
    config = os.path.join(REPO, meta["maskfrozen_config"])
    out = str(tmp_path / f"{name}.pth")
    report = convert_official(CASES[name], config, c["checkpoint"], out, tuple(golden_opts(meta)))
    cfg = load_config(config, golden_opts(meta))
    model = build_model(cfg)
    model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    model.double()
    model.backbone.features = [f.double() for f in c["inputs"]["features"]]
    return c, cfg, model, report


def batched_inputs(c, with_targets: bool) -> List[Dict[str, Any]]:
    """Images of the fixture's sizes (content unused: the backbone returns the features), the
    output size asked, and the targets as detectron2 instances (contiguous classes)."""
    category_to_class = {cid: k for k, cid in enumerate(coco_contiguous_ids())}
    batch = []
    for i, ((h, w), (out_h, out_w)) in enumerate(zip(c["inputs"]["image_sizes"], c["inputs"]["output_sizes"])):
        x = {"image": torch.zeros(3, h, w, dtype=torch.uint8), "height": out_h, "width": out_w}
        if with_targets:
            t = c["inputs"]["targets"][i]
            cxcywh = t["boxes"].double()
            xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(xyxy * torch.tensor([w, h, w, h], dtype=torch.float64))
            inst.gt_classes = torch.tensor([category_to_class[int(l)] for l in t["labels"]])
            x["instances"] = inst
        batch.append(x)
    return batch


class Stages:
    """Our intermediate values of one forward (hooks on the model's stages)."""

    def __init__(self, model):
        self.values: Dict[str, Any] = {"pos": [], "matcher": []}
        self.model = model
        t = model.transformer
        self.originals = {"encode": t.encode, "select": t.select, "decode": t.decode}
        t.encode = self._wrap("encode", lambda args, out: (args[1], out))
        t.select = self._wrap("select", lambda args, out: out)
        t.decode = self._wrap("decode", lambda args, out: out)
        self.handles = [
            model.neck.register_forward_hook(lambda m, i, out: self.values.__setitem__("srcs", out)),
            model.position_embedding.register_forward_hook(lambda m, i, out: self.values["pos"].append(out)),
            model.criterion.matcher.register_forward_hook(lambda m, i, out: self.values["matcher"].append(out)),
        ]

    def _wrap(self, name, keep):
        original = getattr(self.model.transformer, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            self.values[name] = keep(args, out)
            return out
        return wrapped

    def close(self):
        for name, fn in self.originals.items():
            setattr(self.model.transformer, name, fn)
        for h in self.handles:
            h.remove()


def official_denoising(dn, groups: int, max_gt: int):
    """The official noised labels / boxes per slot; the group count and layout must be ours."""
    assert (groups, 2 * max_gt * groups) == (dn["num_groups"], dn["labels"].shape[1]), "denoising groups differ"
    return dn["labels"], dn["boxes"].double()


def flat(maps):
    if maps[0].dim() == 3:
        return torch.cat([m.flatten(1) for m in maps], 1)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory):
    """(case, our inference stages, our detections, our training losses + stages) per model."""
    torch.set_num_threads(1)
    c, cfg, model, report = converted_model(request.param, tmp_path_factory.mktemp(request.param))
    model.eval()
    stages = Stages(model)
    with torch.no_grad():
        detections = model(batched_inputs(c, with_targets=False))
    stages.close()
    model.train()
    training = Stages(model)
    dn = c["inputs"].get("denoising")
    if dn is not None:  # the official run's noised groups instead of fresh noise
        model.denoising.noise = lambda targets, groups, max_gt: official_denoising(dn, groups, max_gt)
    losses = model(batched_inputs(c, with_targets=True))
    training.close()
    return {"name": request.param, "case": c, "cfg": cfg, "model": model, "report": report, "eval": stages.values,
            "detections": detections, "losses": losses, "train": training.values}


# ----------------------------------------------------------------------------- comparisons
def test_conversion_maps_every_tensor(run):
    report = run["report"]
    assert not report.unused_source_keys and not report.unmatched_target_keys
    assert len(report.renamed) + len(report.dropped_aliases) == report.num_source_tensors


def test_padding_masks_and_position_embeddings(run):
    official, ours = run["case"]["outputs"], run["eval"]
    masks = ours["encode"][0]
    assert_trees_close(list(masks), official["masks"], what="level padding masks")
    assert_trees_close(flat(ours["pos"]), official["pos"], atol=1e-6, what="position embeddings")


def test_input_projections_and_encoder_memory(run):
    official, ours = run["case"]["outputs"], run["eval"]
    assert_trees_close(flat(ours["srcs"]), official["srcs"], atol=ATOL, what="input projections")
    assert_trees_close(ours["encode"][1].memory, official["memory"], atol=ATOL, what="encoder memory")


def test_two_stage_proposals(run):
    """Scores the selection ranks by, proposal boxes of every token, the selected tokens (exact;
    among invalid tokens, which tie exactly, only that the same number is taken), their logits."""
    official, name = run["case"]["outputs"]["two_stage"], run["name"]
    proposals = run["eval"]["select"].proposals
    scores = proposals.logits.max(-1).values if name == "dino" else proposals.logits[..., 0]
    assert_trees_close(scores, official["scores"], atol=ATOL, what="two-stage scores")
    assert_trees_close(proposals.boxes, official["boxes"], atol=ATOL, what="two-stage boxes")
    invalid = (official["boxes"] == 1).all(-1)
    ours_index, official_index = proposals.index, official["index"]
    for i in range(len(official_index)):
        ours_invalid, official_invalid = invalid[i][ours_index[i]], invalid[i][official_index[i]]
        assert torch.equal(ours_invalid, official_invalid), f"image {i}: invalid selections differ"
        assert torch.equal(ours_index[i][~ours_invalid], official_index[i][~official_invalid]), f"image {i}"
    selected = torch.gather(proposals.logits, 1, ours_index[..., None].expand(-1, -1, proposals.logits.shape[-1]))
    assert_trees_close(selected, official["selected_logits"], atol=ATOL, what="selected proposal logits")


def test_every_decoder_layer(run):
    official = run["case"]["outputs"]["layers"]
    decoded, queries = run["eval"]["decode"], run["eval"]["select"]
    one2one = queries.query_groups["one2one"]
    ours = {"logits": decoded.pred_logits[:, :, one2one], "boxes": decoded.pred_boxes[:, :, one2one]}
    assert_trees_close(ours, official, atol=ATOL, what="decoder layers")


def test_final_instances_at_the_output_size(run):
    """Official post-processing (top-k over queries x 91 classes, boxes scaled to the output
    size, not clipped) with COCO category ids mapped to detectron2's contiguous classes and the
    rows without a COCO class dropped, as COCOEvaluator scores them."""
    category_to_class = {cid: k for k, cid in enumerate(coco_contiguous_ids())}
    for i, (ours, official) in enumerate(zip(run["detections"], run["case"]["outputs"]["detections"])):
        inst = ours["instances"]
        assert inst.image_size == tuple(run["case"]["inputs"]["output_sizes"][i])
        keep = torch.tensor([int(l) in category_to_class for l in official["labels"]])
        expected = {"scores": official["scores"][keep], "boxes": official["boxes"][keep],
                    "classes": torch.tensor([category_to_class[int(l)] for l in official["labels"][keep]])}
        got = {"scores": inst.scores, "boxes": inst.pred_boxes.tensor, "classes": inst.pred_classes}
        assert_trees_close(got, expected, atol=1e-4, what=f"image {i} detections")


LOSS_NAMES = {"loss_ce": "loss_class", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}


def official_loss_name(name: str) -> str:
    """Official loss key -> ours: loss_ce_3 -> loss_class_aux3, loss_bbox_dn_1 ->
    loss_bbox_dn_aux1, loss_giou_interm -> loss_giou_enc, loss_ce_2_one2many -> loss_class_one2many_aux2."""
    parts = name.split("_")
    base = LOSS_NAMES["_".join(parts[:2])]
    rest = parts[2:]
    group = "_one2many" if "one2many" in rest else ""
    rest = [p for p in rest if p != "one2many"]
    suffix = ""
    if "dn" in rest:
        suffix, rest = "_dn", [p for p in rest if p != "dn"]
    if rest in (["enc"], ["interm"]):
        return base + "_enc"
    layer = f"_aux{rest[0]}" if rest else ""
    return base + suffix + group + layer


def test_training_matcher_indices_and_every_loss(run):
    """Every matcher call (one-to-one layers, encoder, H-DETR's one-to-many layers) in order;
    one-to-many targets are k identical copies of each GT, so a query matched to another copy of
    the same GT is the same assignment: those compare as GT index (target index mod #GT)."""
    official = run["case"]["outputs"]["training"]
    num_gt = [len(t["labels"]) for t in run["case"]["inputs"]["targets"]]
    one2one_calls = run["cfg"].MODEL.DETR.DEC_LAYERS + 1

    def identity(calls):
        return [[[q, t % n if c >= one2one_calls else t] for (q, t), n in zip(call, num_gt)]
                for c, call in enumerate(calls)]
    ours_indices = identity([[[q, t] for q, t in call] for call in run["train"]["matcher"]])
    assert_trees_close(ours_indices, identity(official["matcher"]), what="matcher indices (every call, in order)")
    expected = {official_loss_name(k): v for k, v in official["losses"].items()}
    assert sorted(run["losses"]) == sorted(expected)
    # 1e-5: the shared criterion's GIoU loss (torchvision) adds eps = 1e-7 to its denominators, the
    # official 1 - GIoU does not: up to 4e-6 on the small denoising boxes (every other term <= 1e-9)
    assert_trees_close(dict(run["losses"]), expected, atol=1e-5, what="weighted losses")


def test_mask_frozen_detr_loads_the_converted_dino_as_its_detector(tmp_path):
    """configs/coco/mask_frozen_detr/dino_R50_4scale_6ep.yaml with the golden reductions: the
    official DINO checkpoint converted with the DINO config loads strictly as the frozen
    detector, whose per-layer logits and boxes are the official ones, and the whole model runs."""
    torch.set_num_threads(1)
    c = case("dino")
    meta = c["meta"]
    converted = str(tmp_path / "dino.pth")
    convert_official("original_dino", os.path.join(REPO, meta["maskfrozen_config"]), c["checkpoint"], converted,
                     tuple(golden_opts(meta)))
    config = os.path.join(REPO, "configs", "coco", "mask_frozen_detr", "dino_R50_4scale_6ep.yaml")
    cfg = load_config(config, golden_opts(meta) + ["MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", converted,
                                                   "MODEL.MASK_FROZEN.NUM_QUERIES", "10"])
    model = build_model(cfg).double().eval()
    detector = model.detector
    assert not any(p.requires_grad for p in detector.parameters())
    detector.backbone.features = [f.double() for f in c["inputs"]["features"]]
    inputs = batched_inputs(c, with_targets=False)
    with torch.no_grad():
        detected = detector.detect(detector.preprocess_image(inputs)).transformer
        results = model(inputs)
    one2one = detected.query_groups["one2one"]
    ours = {"logits": detected.pred_logits[:, :, one2one], "boxes": detected.pred_boxes[:, :, one2one]}
    assert_trees_close(ours, c["outputs"]["layers"], atol=ATOL, what="Mask Frozen-DETR's detector")
    assert [r["instances"].image_size for r in results] == [tuple(s) for s in c["inputs"]["output_sizes"]]
