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
soft-NMS, 300 kept, at the output size).
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
