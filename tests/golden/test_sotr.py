"""SOTR against its official implementation (easton-cau/SOTR 341ef54), on the committed fixtures
``fixtures/sotr_infer`` and ``fixtures/sotr_train`` (tools/golden/official_sotr.py): a narrow
ResNet-50-FPN at 32 channels, a 2-layer twin transformer with 4 heads, grids [10, 8, 6, 5, 4],
3 classes.

The official checkpoint is converted with tools/convert_checkpoint.py (``--format sotr``) and
loaded strictly into the model of our COCO R50 config with the same reductions. Inference (two
images of different sizes in one batch, output sizes different from the input sizes): FPN
features, every twin transformer call, class logits and kernels per level and the mask feature
in float32; the same heads, the Matrix NMS inputs and outputs and the final ``Instances`` (and
their COCO json, COCOEvaluator's path) in float64, where no mask pixel sits within float32
noise of the threshold. Training (image sizes not multiples of 4, two objects sharing cells,
an empty mask): the targets exactly and both loss terms.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import maskfrozen.modeling.sotr.inference as sotr_inference
from golden_compare import REPO, assert_trees_close, case, convert_official
from maskfrozen.modeling.postprocess import boxes_from_masks
from query_seg_helpers import converted_model, unpack_masks

ATOL32, ATOL64 = 1e-4, 1e-9


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    torch.set_num_threads(1)
    c = case("sotr_infer")
    model, report = converted_model(c, str(tmp_path_factory.mktemp("sotr")), "sotr")
    return model.eval(), report, c


def _nchw(per_level):
    """Our ``[B, N, N, C]`` head outputs in the official ``[B, C, N, N]`` layout."""
    return [x.permute(0, 3, 1, 2) for x in per_level]


def _inference_stages(model, c, dtype, monkeypatch):
    inputs = [{"image": im.to(dtype), "height": h, "width": w}
              for im, (h, w) in zip(c["inputs"]["images"], c["inputs"]["output_sizes"])]
    store = {"transformer": [], "matrix_nms": []}
    hooks = [model.backbone.register_forward_hook(lambda m, a, o: store.__setitem__("features", o)),
             model.head.transformer.register_forward_hook(lambda m, a, o: store["transformer"].append(o)),
             model.head.register_forward_hook(lambda m, a, o: store.__setitem__("head", o)),
             model.mask_branch.register_forward_hook(lambda m, a, o: store.__setitem__("mask_feature", o))]
    nms = sotr_inference.matrix_nms

    def recording_nms(masks, labels, scores, *args):
        out = nms(masks, labels, scores, *args)
        bits = torch.from_numpy(np.packbits(masks.flatten(1).numpy(), axis=1))
        store["matrix_nms"].append({"labels": labels, "masks_bits": bits, "scores": scores, "decayed": out})
        return out

    monkeypatch.setattr(sotr_inference, "matrix_nms", recording_nms)
    try:
        with torch.no_grad():
            results = model.to(dtype)(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.float()
    logits, kernels = store["head"]
    stages = {"features": store["features"], "cate": _nchw(logits), "kernel": _nchw(kernels),
              "transformer": {"grids": store["transformer"][:-1], "p5": store["transformer"][-1]},
              "mask_feature": store["mask_feature"], "matrix_nms": store["matrix_nms"]}
    return stages, results


def test_every_official_tensor_is_mapped(golden):
    _, report, c = golden
    checkpoint = torch.load(c["checkpoint"], weights_only=True)["model"]
    assert report.num_source_tensors == len(checkpoint) == len(report.renamed) == 349
    assert not report.dropped_aliases and not report.unused_source_keys and not report.unmatched_target_keys


def test_every_tensor_of_the_full_size_official_r50_maps_into_our_coco_r50_model():
    """The official R50 model's 549 keys and shapes (ResNet-50-FPN, 12 twin layers at 256
    channels, recorded from the official code in meta.json) fill our COCO R50 model exactly."""
    from maskfrozen.checkpoint import convert_sotr_state_dict
    from maskfrozen.config import load_config

    shapes = case("sotr_infer")["meta"]["official_R50_state_dict_shapes"]
    cfg = load_config(os.path.join(REPO, "configs/coco/sotr/sotr_R50.yaml"), ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        target = build_model(cfg).state_dict()
    source = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    _, report = convert_sotr_state_dict(source, target)
    assert len(shapes) == len(report.renamed) == len(target) == 549
    assert not report.unused_source_keys and not report.unmatched_target_keys and not report.dropped_aliases


@pytest.mark.parametrize("fmt", ["detrex", "fastinst", "mask2former"])
def test_other_formats_refuse_an_official_sotr_checkpoint(golden, fmt, tmp_path):
    out = tmp_path / "out.pth"
    with pytest.raises(SystemExit, match="--format sotr"):
        convert_official(fmt, golden[2]["meta"]["maskfrozen_config"], golden[2]["checkpoint"], str(out),
                         tuple(golden[2]["meta"]["maskfrozen_overrides"]))
    assert not out.exists()


def test_only_the_sotr_format_fits_and_a_detectron2_pkl_converts_like_the_pth(golden, tmp_path):
    """The registry recognises the official keys as SOTR's alone; the model-zoo ``.pkl`` form
    (pickled numpy arrays, read with --allow-pickle) converts to the same tensors."""
    from maskfrozen.checkpoint.formats import matching_formats

    _, _, c = golden
    checkpoint = torch.load(c["checkpoint"], weights_only=True)["model"]
    assert matching_formats(list(checkpoint)) == ["sotr"]
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in checkpoint.items()}, "__author__": "test"}, f)
    meta = c["meta"]
    convert_official("sotr", meta["maskfrozen_config"], str(pkl), str(tmp_path / "from_pkl.pth"),
                     tuple(meta["maskfrozen_overrides"]), ("--allow-pickle",))
    convert_official("sotr", meta["maskfrozen_config"], c["checkpoint"], str(tmp_path / "from_pth.pth"),
                     tuple(meta["maskfrozen_overrides"]))
    from_pkl = torch.load(tmp_path / "from_pkl.pth", weights_only=True)["model"]
    from_pth = torch.load(tmp_path / "from_pth.pth", weights_only=True)["model"]
    assert from_pkl.keys() == from_pth.keys() and all(torch.equal(from_pkl[k], from_pth[k]) for k in from_pth)


def test_float32_stages_equal_the_official(golden, monkeypatch):
    """FPN, twin transformer on each grid and on the full-size P5, heads, mask feature."""
    model, _, c = golden
    ours, _ = _inference_stages(model, c, torch.float32, monkeypatch)
    official = c["outputs"]["float32"]
    for name in ("features", "transformer", "cate", "kernel", "mask_feature"):
        assert_trees_close(ours[name], official[name], ATOL32, name)


def test_float64_heads_matrix_nms_and_instances_equal_the_official(golden, monkeypatch):
    """Heads, the Matrix NMS inputs (after score, area and maskness filtering and the pre-NMS
    top-k) and decayed scores, and the final instances at the output size (the second image's
    masks upsampled by the official ``ceil(h / f_h)`` = 3)."""
    model, _, c = golden
    ours, results = _inference_stages(model, c, torch.float64, monkeypatch)
    official = c["outputs"]["float64"]
    for name in ("transformer", "cate", "kernel", "matrix_nms"):
        assert_trees_close(ours[name], official[name], ATOL64, name)
    for i, (r, ref) in enumerate(zip(results, official["instances"])):
        inst = r["instances"]
        h, w = ref["image_size"].tolist()
        assert inst.image_size == (h, w) == tuple(c["inputs"]["output_sizes"][i])
        assert torch.equal(inst.pred_classes, ref["pred_classes"])
        assert (inst.scores - ref["scores"]).abs().max() < ATOL64
        assert torch.equal(inst.pred_masks, unpack_masks(ref["pred_masks_bits"], h, w))


def test_coco_json_equals_the_official_with_boxes_from_masks(golden, monkeypatch):
    """COCOEvaluator's path: segmentation RLEs, scores and categories as the official; boxes
    ours from the masks (the official leaves them zero)."""
    model, _, c = golden
    _, results = _inference_stages(model, c, torch.float64, monkeypatch)
    for i, (r, ref) in enumerate(zip(results, c["outputs"]["float64"]["instances"])):
        h, w = ref["image_size"].tolist()
        masks = unpack_masks(ref["pred_masks_bits"], h, w)
        official = Instances((h, w), pred_masks=masks, scores=ref["scores"].float(), pred_classes=ref["pred_classes"],
                             pred_boxes=Boxes(torch.zeros(len(masks), 4)))
        inst = r["instances"]
        inst.scores = inst.scores.float()
        mine, theirs = instances_to_coco_json(inst, i), instances_to_coco_json(official, i)
        assert [d["segmentation"] for d in mine] == [d["segmentation"] for d in theirs]
        assert [(d["category_id"], d["score"]) for d in mine] == [(d["category_id"], d["score"]) for d in theirs]
        expected_boxes = boxes_from_masks(masks).tensor
        expected_boxes[:, 2:] -= expected_boxes[:, :2]  # XYWH, as the json
        assert np.allclose([d["bbox"] for d in mine], expected_boxes.numpy())


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def training(golden):
    model, _, _ = golden
    c = case("sotr_train")
    inputs = []
    for image, obj in zip(c["inputs"]["images"], c["inputs"]["objects"]):
        inst = Instances(tuple(image.shape[-2:]), gt_boxes=Boxes(obj["gt_boxes"]), gt_classes=obj["gt_classes"],
                         gt_masks=BitMasks(obj["gt_masks"]))
        inputs.append({"image": image, "height": image.shape[1], "width": image.shape[2], "instances": inst})
    return model, inputs, c


def test_training_targets_equal_the_official(training):
    """Per image and level: the class grid, the positive cells, the (cell, object) pairs in the
    official order (a cell shared by two objects twice) and their mask targets (the unpadded
    mask resized to round(size / 4) by OpenCV, pasted top-left)."""
    model, inputs, c = training
    official = c["outputs"]["targets"]
    images = model.preprocess_image(inputs)
    feature_size = (images.tensor.shape[-2] // 4, images.tensor.shape[-1] // 4)
    ours = {"cate_labels": [], "positive": [], "grid_order": [], "mask_targets": []}
    for target in model.prepare_targets(inputs, images):
        levels, masks = model.loss.image_targets(target, feature_size)
        ours["cate_labels"].append([t.labels for t in levels])
        ours["positive"].append([t.positive for t in levels])
        ours["grid_order"].append([t.cells for t in levels])
        ours["mask_targets"].append([masks[t.gt_index].to(torch.uint8) for t in levels])
    assert_trees_close(ours, official, 0, "training targets")
    shared = official["grid_order"][0][2]
    assert len(shared) == 2 and shared[0] == shared[1]  # two objects in one cell: one target each


def test_training_losses_equal_the_official(training):
    """Focal loss over every cell / (positive cells + 1); dice 1 - 2 sum(pt) / (sum p^2 + sum t^2
    + 0.002), mean over the (cell, object) pairs, x 3."""
    model, inputs, c = training
    model.train()
    try:
        losses = model(inputs)
    finally:
        model.eval()
    official = c["outputs"]["losses"]
    ours = {"loss_cate": losses["loss_cls"], "loss_ins": losses["loss_mask"]}
    assert_trees_close(ours, official, 1e-5, "losses")
