"""Mask Frozen-DETR: frozen detector, every mask-network option, box pasting, mask-score
targets, checkpoint errors and DefaultPredictor output, on the tiny config (CPU)."""
import copy
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO, captured_logs, make_cfg
from maskfrozen.modeling.criterion.point_sampling import box_points_to_image
from maskfrozen.modeling.mask_frozen.criterion import MaskIoULoss
from maskfrozen.modeling.mask_frozen.mask_network import MaskPredictions
from maskfrozen.modeling.mask_frozen.mask_region import BoxMaskRegion, ImageMaskRegion
from maskfrozen.modeling.mask_frozen.roi_ops import roi_align_per_query
from maskfrozen.modeling.postprocess import instances_to_output_size

TINY = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "dino_R18_tiny.yaml")


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    """Two mapped training images of shapes_tiny_train (with GT masks)."""
    from maskfrozen.engine import Trainer

    cfg = make_cfg(TINY, tmp_path_factory.mktemp("batch"))
    return next(iter(Trainer.build_train_loader(cfg)))


@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory):
    """A tiny DINO checkpoint with non-default weights: (path, state_dict)."""
    from maskfrozen.modeling.mask_frozen.meta_arch import build_frozen_detector

    out = tmp_path_factory.mktemp("detector")
    torch.manual_seed(1)
    detector = build_frozen_detector(make_cfg(TINY, out))
    state = {k: v.clone() for k, v in detector.state_dict().items()}
    path = os.path.join(out, "detector.pth")
    torch.save({"model": state}, path)
    return path, state


def test_detector_weights_loaded_and_bit_identical_after_training(tmp_path, detector_checkpoint):
    from maskfrozen.engine import Trainer

    path, saved = detector_checkpoint
    cfg = make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", path,
                   "MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR", "False", "SOLVER.MAX_ITER", "3",
                   "SOLVER.BASE_LR", "0.01")
    trainer = Trainer(cfg)
    model = trainer.model
    detector_params = {id(p) for p in model.detector.parameters()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized and not optimized & detector_params
    assert optimized == {id(p) for p in model.mask_network.parameters()}
    mask_before = copy.deepcopy(model.mask_network.state_dict())
    model.train()
    assert not model.detector.training and not any(m.training for m in model.detector.modules())
    trainer.train()
    for name, value in model.detector.state_dict().items():
        assert torch.equal(value, saved[name]), name  # parameters and BN statistics
    assert all(p.grad is None for p in model.detector.parameters())
    changed = [k for k, v in model.mask_network.state_dict().items() if not torch.equal(v, mask_before[k])]
    assert changed


OPTIONS = [
    # (description, overrides, module whose parameters must receive a gradient)
    ("baseline image masks", ["MODEL.MASK_FROZEN.MASK_REGION", "image", "MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME", "none",
                              "MODEL.MASK_FROZEN.BOX_ENCODER.NAME", "none", "MODEL.MASK_FROZEN.QUERY_ENCODER.NAME", "none",
                              "MODEL.MASK_FROZEN.MASK_SCORING.ENABLED", "False", "MODEL.MASK_FROZEN.NECK", "linear"],
     "neck"),
    ("deformable encoder", ["MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME", "deformable"], "image_encoder"),
    ("swin encoder", ["MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME", "swin", "MODEL.MASK_FROZEN.IMAGE_ENCODER.DEPTH", "2"],
     "image_encoder"),
    ("convnext encoder", ["MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME", "convnext"], "image_encoder"),
    ("box transformer", ["MODEL.MASK_FROZEN.BOX_ENCODER.NAME", "transformer"], "box_encoder"),
    ("query cross", ["MODEL.MASK_FROZEN.QUERY_ENCODER.NAME", "cross"], "query_encoder"),
    ("query cross+self", ["MODEL.MASK_FROZEN.QUERY_ENCODER.NAME", "cross_self"], "query_encoder"),
    ("query cross+self+ffn", ["MODEL.MASK_FROZEN.QUERY_ENCODER.NAME", "cross_self_ffn",
                              "MODEL.MASK_FROZEN.BOX_ENCODER.NAME", "none", "MODEL.MASK_FROZEN.MASK_EMBED_LAYERS", "0"],
     "query_encoder"),
    ("image masks + scoring", ["MODEL.MASK_FROZEN.MASK_REGION", "image"], "scoring_head"),
]


@pytest.mark.parametrize("overrides,module", [o[1:] for o in OPTIONS], ids=[o[0] for o in OPTIONS])
def test_each_option_builds_runs_and_trains_a_step(tmp_path, tiny_batch, overrides, module):
    torch.manual_seed(0)
    model = build_model(make_cfg(TINY, tmp_path, *overrides))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    watched = [p for p in getattr(model.mask_network, module).parameters()]
    assert watched, module
    before = [p.detach().clone() for p in watched]
    model.train()
    losses = model(tiny_batch)
    assert set(losses) >= {"loss_mask", "loss_dice"} and all(torch.isfinite(v) for v in losses.values())
    assert ("loss_mask_iou" in losses) == (model.mask_network.scoring_head is not None)
    opt.zero_grad()
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in watched)
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(watched, before))
    model.eval()
    with torch.no_grad():
        result = model(tiny_batch[:1])[0]["instances"]
    h, w = tiny_batch[0]["height"], tiny_batch[0]["width"]
    assert result.pred_masks.shape[1:] == (h, w) and result.pred_masks.dtype == torch.bool
    assert len(result) == model.test_topk and (result.scores[:-1] >= result.scores[1:]).all()


def test_box_region_masks_paste_at_the_right_place():
    box = torch.tensor([[8.0, 4.0, 24.0, 20.0]])  # 16 x 16 px in a 32 x 32 input

    def pasted(roi, size):
        inst = Instances((32, 32), pred_boxes=Boxes(box.clone()), scores=torch.ones(1),
                         pred_classes=torch.zeros(1, dtype=torch.long), pred_masks=roi)
        return instances_to_output_size(inst, size, size).pred_masks[0]

    # a 16x16 RoI map (one cell per pixel) whose left half is on: pasted exactly
    fine = torch.zeros(1, 1, 16, 16)
    fine[..., :8] = 1.0
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[4:20, 8:16] = True
    assert torch.equal(pasted(fine, 32), expected)
    # a 4x4 map, output twice the input size: the box scales to (16, 8, 48, 40); the
    # left half is on up to x = 32, only the corners are rounded by the bilinear paste
    roi = torch.zeros(1, 1, 4, 4)
    roi[..., :2] = 1.0
    mask = pasted(roi, 64)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[8:40, 16:32] = True
    assert not (mask & ~inside).any()
    assert mask[12:36, 16:32].all() and mask[8:40, 20:28].all()
    # RoIAlign of a feature map inside the same box reads back the same region (one sample
    # per bin = the bin centre = a feature cell centre here, so the read-back is exact)
    features = torch.zeros(1, 1, 8, 8)  # stride 4 over the 32x32 input
    features[0, 0, 1:5, 2:4] = 1.0  # input pixels x in [8, 16), y in [4, 20)
    pooled = roi_align_per_query(features, torch.tensor([[[8.0, 4.0, 24.0, 20.0]]]), 4, 0.25, sampling_ratio=1)
    torch.testing.assert_close(pooled[0, 0], roi[0, 0])
    # and points of the box frame map into the image where the pasted mask puts them
    pts = box_points_to_image(torch.tensor([[[0.25, 0.5]]]), torch.tensor([[8.0, 4.0, 24.0, 20.0]]), (32, 32))
    torch.testing.assert_close(pts, torch.tensor([[[12.0 / 32, 12.0 / 32]]]))


def test_mask_score_targets_equal_hand_computed_iou():
    # box mode: left half on inside box (0, 0, 8, 8) of an 8x8 image -> columns 0..3
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[..., :2] = 5.0
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[:, :4, :] = True  # rows 0..3
    box = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    first = (torch.tensor([0]), torch.tensor([0]))
    box_loss = MaskIoULoss(BoxMaskRegion(roi_size=4, c1_stride=4))
    outputs = BoxMaskRegion(roi_size=4, c1_stride=4).criterion_outputs(logits, box, 1)
    iou = box_loss.targets(outputs, gt, *first)
    torch.testing.assert_close(iou, torch.tensor([16.0 / 48.0]))  # 16 px shared, 48 px in the union
    # same prediction as an image-mode map at stride 4 (2x2 logits over the 8x8 image)
    image_logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])
    region = ImageMaskRegion(roi_size=4, c1_stride=4)
    iou = MaskIoULoss(region).targets(region.criterion_outputs(image_logits, box, 1), gt, *first)
    torch.testing.assert_close(iou, torch.tensor([1.0 / 3.0]))
    # the loss term: squared error to that target / number of masks
    outputs["pred_mask_iou"] = torch.tensor([[0.5]])
    loss = box_loss(outputs, [{"masks": gt}], [first[1:] + first[1:]], 2.0)["loss_mask_iou"]
    torch.testing.assert_close(loss, torch.tensor((0.5 - 16.0 / 48.0) ** 2 / 2.0))


def test_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path, detector_checkpoint):
    with pytest.raises(ValueError, match="DETECTOR_WEIGHTS is empty"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR", "False"))
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", str(tmp_path / "no_such.pth")))
    _, state = detector_checkpoint
    bad = dict(state)
    bad.pop(next(k for k in bad if k.startswith("transformer.")))
    key = next(k for k in bad if k.endswith("class_embed.0.weight"))
    bad[key] = torch.zeros(3, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(ValueError, match=r"1 missing keys .*1 shape mismatches .*class_embed\.0\.weight"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", str(path)))


def test_inference_ranks_query_class_pairs_by_class_times_mask_iou(tmp_path):
    """Inference = top-k (query, class) pairs of the selected queries, score = class
    probability x predicted mask IoU; a query may come back with a second class."""
    from detectron2.structures import ImageList

    from maskfrozen.modeling.mask_frozen.meta_arch import SelectedQueries

    model = build_model(make_cfg(TINY, tmp_path, "TEST.DETECTIONS_PER_IMAGE", "3")).eval()
    probs = torch.full((1, 2, 5), 0.01)
    probs[0, 0, :2] = torch.tensor([0.9, 0.6])
    probs[0, 1, 0] = 0.8
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 32.0]]])
    selected = SelectedQueries(index=torch.tensor([[0, 1]]), embeddings=torch.zeros(1, 2, 32),
                               logits=torch.logit(probs), boxes_normalized=boxes / 32, boxes=boxes)
    mask_logits = torch.full((2, 1, 4, 4), 5.0)
    preds = MaskPredictions(mask_logits, boxes[0], iou=torch.tensor([0.5, 1.0]))
    images = ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)])
    inst = model.inference(preds, selected, [{"height": 32, "width": 32}], images)[0]["instances"]
    # pairs: (q1, c0) 0.8 x 1.0, (q0, c0) 0.9 x 0.5, (q0, c1) 0.6 x 0.5
    torch.testing.assert_close(inst.scores, torch.tensor([0.8, 0.45, 0.30]))
    assert inst.pred_classes.tolist() == [0, 0, 1]
    torch.testing.assert_close(inst.pred_boxes.tensor, boxes[0][[1, 0, 0]])
    # the masks are pasted into their own boxes (bilinear paste: corners may round off)
    for mask, (x0, y0, x1, y1) in zip(inst.pred_masks, inst.pred_boxes.tensor.int().tolist()):
        inside = mask[y0:y1, x0:x1].sum()
        assert mask.sum() == inside and inside >= 0.95 * (x1 - x0) * (y1 - y0)
    # a detector whose class-head rows are category ids (CLASS_ROWS coco_category_id): rows map to
    # dataset classes through the detector, pairs of a row that is no class are dropped after the top-k
    model.detector.class_of_row = torch.tensor([-1, 0, 1, 2, 3])
    inst = model.inference(preds, selected, [{"height": 32, "width": 32}], images)[0]["instances"]
    torch.testing.assert_close(inst.scores, torch.tensor([0.30]))
    assert inst.pred_classes.tolist() == [0] and len(inst.pred_masks) == 1
    torch.testing.assert_close(inst.pred_boxes.tensor, boxes[0][[0]])


def test_default_predictor_returns_masks_at_input_size(tmp_path):
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(make_cfg(TINY, tmp_path))
    image = (np.random.default_rng(0).random((90, 150, 3)) * 255).astype(np.uint8)
    inst = predictor(image)["instances"]
    assert len(inst) == 10
    assert inst.pred_masks.shape == (10, 90, 150) and inst.pred_masks.dtype == torch.bool
    assert inst.pred_boxes.tensor.shape == (10, 4) and inst.scores.shape == (10,)
    assert (inst.pred_boxes.tensor[:, 2] <= 150).all() and (inst.pred_boxes.tensor[:, 3] <= 90).all()


@pytest.mark.parametrize("name", ["dino_R50_4scale_6ep.yaml", "h_detr_R50_two_stage_6ep.yaml"])
def test_coco_configs_use_the_code_defaults_and_paper_schedule(tmp_path, name):
    from detectron2.config import get_cfg

    from maskfrozen.config import add_maskfrozen_config

    cfg = make_cfg(os.path.join(REPO, "configs", "coco", "mask_frozen_detr", name), tmp_path)
    defaults = get_cfg()
    add_maskfrozen_config(defaults)
    shipped = dict(cfg.MODEL.MASK_FROZEN)
    assert shipped.pop("DETECTOR_WEIGHTS").endswith("model_final.pth")
    expected = dict(defaults.MODEL.MASK_FROZEN)
    expected.pop("DETECTOR_WEIGHTS")
    assert shipped == expected
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == ("ADAMW", 1.5e-4, 5e-5, 8)
    assert s.STEPS == (int(0.9 * s.MAX_ITER), int(0.95 * s.MAX_ITER)) and s.MAX_ITER == 88500
    assert "res2" in cfg.MODEL.RESNETS.OUT_FEATURES and cfg.MODEL.MASK_ON and cfg.MODEL.WEIGHTS == ""


@pytest.mark.parametrize("name", ["dino_R50_4scale_6ep.yaml", "h_detr_R50_two_stage_6ep.yaml"])
def test_coco_configs_build_and_predict_a_small_image(tmp_path, name, one_thread):
    """The COCO configs (R50, 900 / 300 queries) build and predict; at 128 x 160 the
    encoder has 426 tokens, fewer than the queries: selection pads instead of failing."""
    cfg = make_cfg(os.path.join(REPO, "configs", "coco", "mask_frozen_detr", name), tmp_path,
                   "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", "", "MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR", "True",
                   "MODEL.DEVICE", "cpu")
    model = build_model(cfg).eval()
    assert type(model.detector).__name__ == "DeformableDETRFamily" and model.detector.hidden_dim == 256
    image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)
    with torch.no_grad():
        inst = model([{"image": image, "height": 128, "width": 160}])[0]["instances"]
    # 91 class-head rows = COCO category ids: pairs of the 11 rows of no category are dropped after the top 100
    assert inst.pred_masks.shape[1:] == (128, 160) and 0 < len(inst) <= 100 and len(inst.pred_masks) == len(inst)
    assert torch.isfinite(inst.scores).all() and (inst.scores >= 0).all()
    assert int(inst.pred_classes.max()) < 80 and int(inst.pred_classes.min()) >= 0


def test_polygon_gt_masks_are_rasterised_into_the_padded_targets(tmp_path):
    """COCO configs read polygons (INPUT.MASK_FORMAT polygon): the targets are the
    rasterised polygons, padded to the batch's padded size."""
    from detectron2.structures import PolygonMasks

    model = build_model(make_cfg(TINY, tmp_path))
    inst = Instances((30, 40))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 20.0, 16.0]]))
    inst.gt_classes = torch.tensor([2])
    inst.gt_masks = PolygonMasks([[[4.0, 6.0, 20.0, 6.0, 20.0, 16.0, 4.0, 16.0]]])
    inputs = [{"image": torch.zeros(3, 30, 40, dtype=torch.uint8), "instances": inst}]
    images = model.detector.preprocess_image(inputs)
    (target,) = model.prepare_targets(inputs, images)
    assert target["masks"].shape == (1, *images.tensor.shape[-2:]) and target["masks"].dtype == torch.bool
    expected = torch.zeros(images.tensor.shape[-2:], dtype=torch.bool)
    expected[6:16, 4:20] = True
    assert torch.equal(target["masks"][0], expected)
    assert target["labels"].tolist() == [2]
    inst.remove("gt_masks")
    with pytest.raises(KeyError, match="no 'segmentation'"):
        model.prepare_targets(inputs, images)


def test_zero_mask_queries_and_corrupt_detector_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"MODEL.MASK_FROZEN.NUM_QUERIES must be >= 1 .*got 0"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.NUM_QUERIES", "0"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=r"DETECTOR_WEIGHTS=.*corrupt\.pth.* not a readable PyTorch checkpoint"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", str(corrupt)))
    no_model = tmp_path / "no_model.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, no_model)
    with pytest.raises(ValueError, match=r"no_model\.pth.*'model' key .*\['state_dict'\]"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", str(no_model)))


def test_more_mask_queries_than_detector_queries_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"MODEL.MASK_FROZEN.NUM_QUERIES 50 is larger than the detector's "
                                         r"MODEL.DETR.NUM_QUERIES 20.*<= 20"):
        build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.NUM_QUERIES", "50"))


def test_deploy_from_a_whole_checkpoint_needs_no_detector_file(tmp_path, detector_checkpoint):
    """MODEL.WEIGHTS = a mask training's model_final.pth: built without reading DETECTOR_WEIGHTS
    (the shipped configs name a file absent on a deploy machine), loaded strictly, detector
    included, and no false "RANDOM detector" warning (tiny config)."""
    from maskfrozen.engine import Predictor
    from maskfrozen.engine.weights import WeightsMismatchError

    path, _ = detector_checkpoint
    trained = build_model(make_cfg(TINY, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", path))
    whole = str(tmp_path / "model_final.pth")
    torch.save({"model": trained.state_dict(), "iteration": 3}, whole)
    shipped_like = ["MODEL.MASK_FROZEN.DETECTOR_WEIGHTS", str(tmp_path / "absent" / "model_final.pth"),
                    "MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR", "False"]
    for extra in (shipped_like, []):
        with captured_logs("maskfrozen") as messages:
            predictor = Predictor(make_cfg(TINY, tmp_path, "MODEL.WEIGHTS", whole, *extra))
        assert not [m for m in messages if "RANDOM" in m]
        assert any("is a whole Mask Frozen-DETR checkpoint: the detector is loaded from it" in m for m in messages)
        loaded = predictor.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    with captured_logs("maskfrozen") as messages:  # really random: the warning stays
        Predictor(make_cfg(TINY, tmp_path))
    assert any("using a RANDOM detector" in m for m in messages)
    broken = dict(trained.state_dict())
    broken.pop(next(k for k in broken if k.startswith("detector.transformer.")))
    torch.save({"model": broken}, whole)
    with pytest.raises(WeightsMismatchError, match=r"model_final\.pth does not fit .*1 missing keys .*detector\."):
        Predictor(make_cfg(TINY, tmp_path, "MODEL.WEIGHTS", whole, *shipped_like))
