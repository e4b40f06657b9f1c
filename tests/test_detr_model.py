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
    model = build_model(tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "7")).eval()
    inputs = _inputs(((64, 48),))
    inputs[0].update(height=128, width=96)  # original image twice the network input
    with torch.no_grad():
        (out,) = model(inputs)
    inst = out["instances"]
    assert inst.image_size == (128, 96) and len(inst) == 7
    assert inst.scores.shape == (7,) and bool((inst.scores[:-1] >= inst.scores[1:]).all())
    assert inst.pred_classes.max() < 5
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0::2] <= 96).all() and (boxes[:, 1::2] <= 128).all() and (boxes >= 0).all()


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
