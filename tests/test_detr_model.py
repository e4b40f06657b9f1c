"""The DeformableDETR meta-architecture end to end on tiny inputs: every variant trains
a step, a tiny DINO overfits two images, and inference works through DefaultPredictor
and COCOEvaluator on the tiny shapes split."""
import os

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import maskfrozen  # noqa: F401  (registers the models)
from maskfrozen.config import load_config
from maskfrozen.engine import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*opts):
    return load_config(TINY, opts, freeze=False)


def _inputs(sizes=((64, 64), (48, 64))):
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in sizes:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 28.0], [20.0, 16.0, 44.0, 46.0]]))
        inst.gt_classes = torch.tensor([0, 3])
        batch.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                      "instances": inst, "height": h, "width": w})
    return batch


VARIANTS = {
    "dino": [],
    "deformable_detr": ["MODEL.DETR.DN_NUMBER", "0", "MODEL.DETR.QUERY_POS", "static", "MODEL.DETR.MIXED_SELECTION",
                        "False", "MODEL.DETR.LOOK_FORWARD_TWICE", "False", "MODEL.DETR.DECODER_FINAL_NORM", "False",
                        "MODEL.DETR.ENC_CLASS_AGNOSTIC", "True"],
    "h_detr": ["MODEL.DETR.DN_NUMBER", "0", "MODEL.DETR.QUERY_POS", "static", "MODEL.DETR.NUM_QUERIES_ONE2MANY", "30",
               "MODEL.DETR.K_ONE2MANY", "3"],
    "plain": ["MODEL.DETR.DN_NUMBER", "0", "MODEL.DETR.QUERY_POS", "static", "MODEL.DETR.TWO_STAGE", "False",
              "MODEL.DETR.BOX_REFINE", "False", "MODEL.DETR.MIXED_SELECTION", "False"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_losses_and_gradients(variant):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*VARIANTS[variant]))
    losses = model(_inputs())
    suffixes = {"dino": ["", "_aux0", "_enc", "_dn", "_dn_aux0"], "deformable_detr": ["", "_aux0", "_enc"],
                "h_detr": ["", "_aux0", "_enc", "_one2many", "_one2many_aux0"], "plain": ["", "_aux0"]}[variant]
    assert set(losses) == {f"loss_{t}{s}" for t in ("class", "bbox", "giou") for s in suffixes}
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_tiny_dino_overfits_two_images():
    """Total loss / 10 within 150 AdamW steps on two 64 px images (reached at ~85).
    Backbone frozen (speed) and mild denoising noise (the dn terms are re-sampled each
    step, so large noise keeps them from reaching a tenth)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DETR.DN_NUMBER", "4", "MODEL.BACKBONE.FREEZE_AT", "5",
                                 "MODEL.DETR.DN_BOX_NOISE", "0.2", "MODEL.DETR.DN_LABEL_NOISE", "0.0"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = _inputs()
    first = None
    for step in range(150):
        loss = sum(model(batch).values())
        first = loss.item() if first is None else first
        if loss.item() < first / 10:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, f"loss {first:.3f} -> {loss.item():.3f} after {step} steps"


def test_inference_topk_and_rescaling():
    """Official post-processing: the top-k (query, class) pairs, boxes = normalised boxes x the
    output size, not clipped (boxes crossing the border keep their extent); CLIP_BOXES (ours)
    clips them to the image as detectron2's detector_postprocess."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "7")).eval()
    with torch.no_grad():  # boxes that cross the image border
        model.transformer.bbox_embed[-2].layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))
    inputs = _inputs(((64, 48),))
    inputs[0].update(height=128, width=96)  # original image twice the network input
    with torch.no_grad():
        (out,) = model(inputs)
        final = model.detect(model.preprocess_image(inputs)).transformer
    inst = out["instances"]
    assert inst.image_size == (128, 96) and len(inst) == 7
    assert inst.scores.shape == (7,) and bool((inst.scores[:-1] >= inst.scores[1:]).all())
    assert inst.pred_classes.max() < 5
    query = final.final_scores[0].flatten().topk(7).indices // 5
    cx, cy, w, h = final.final_boxes[0, query].unbind(-1)
    expected = torch.stack([(cx - w / 2) * 96, (cy - h / 2) * 128, (cx + w / 2) * 96, (cy + h / 2) * 128], -1)
    assert torch.allclose(inst.pred_boxes.tensor, expected, atol=1e-4)
    assert (inst.pred_boxes.tensor < 0).any(), "the test needs boxes crossing the border"
    model.clip_boxes = True
    with torch.no_grad():
        (clipped,) = model(inputs)
    boxes = clipped["instances"].pred_boxes.tensor
    assert (boxes[:, 0::2] <= 96).all() and (boxes[:, 1::2] <= 128).all() and (boxes >= 0).all()


def test_coco_category_rows_targets_and_detections():
    """CLASS_ROWS coco_category_id (the official 91-row heads): GT classes become COCO category
    ids, detections map back to detectron2's contiguous classes and rows of no COCO category
    are dropped after the top-k (as COCO evaluation ignores them)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.DETR.NUM_CLASSES", "91", "MODEL.DETR.CLASS_ROWS", "coco_category_id",
                                 "TEST.DETECTIONS_PER_IMAGE", "10")).eval()
    inputs = _inputs()
    targets = model.prepare_targets(inputs, [(64, 64), (48, 64)])
    assert targets[0]["labels"].tolist() == [1, 4]  # person, motorcycle
    with torch.no_grad():
        for head in model.transformer.class_embed:
            head.bias[12] = 30.0  # no COCO category: the best rows, dropped
            head.bias[90] = 20.0  # toothbrush: contiguous class 79
        (out, _) = model(inputs)
    inst = out["instances"]
    assert 0 < len(inst) < 10 and set(inst.pred_classes.tolist()) == {79}


def test_coco_category_rows_need_91_rows():
    with pytest.raises(ValueError, match="CLASS_ROWS 'coco_category_id' needs NUM_CLASSES 91"):
        build_model(tiny_cfg("MODEL.DETR.CLASS_ROWS", "coco_category_id"))


def test_default_predictor_and_coco_evaluator(tmp_path):
    cfg = tiny_cfg("OUTPUT_DIR", str(tmp_path))
    model = Trainer.build_model(cfg).eval()
    predictor = DefaultPredictor(cfg)
    predictor.model.load_state_dict(model.state_dict())
    image = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    inst = predictor(image)["instances"]
    assert inst.image_size == (100, 140) and len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE
    assert {"pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())

    name = cfg.DATASETS.TEST[0]
    evaluator = Trainer.build_evaluator(cfg, name, str(tmp_path))  # generates the split's files if needed
    assert isinstance(evaluator, COCOEvaluator)
    results = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
    assert set(results) == {"bbox"} and 0.0 <= results["bbox"]["AP"] <= 100.0


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.DETR.NUM_QUERIES", "0", "MODEL.DETR.NUM_QUERIES must be >= 1, got 0"),
    ("TEST.DETECTIONS_PER_IMAGE", "0", "TEST.DETECTIONS_PER_IMAGE must be >= 1, got 0"),
])
def test_zero_queries_or_detections_is_a_config_error(key, value, message):
    """NUM_QUERIES 0 used to train only the denoising losses and report AP nan."""
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg(key, value))
