"""Every shipped DETR config loads, builds, and carries its published settings;
add_detr_config's defaults equal what the Deformable-DETR yaml restates."""
import glob
import os

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import maskfrozen
from maskfrozen.config import add_detr_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = sorted(glob.glob(os.path.join(REPO, "configs", "coco", d, "*.yaml")) for d in ("deformable_detr", "dino", "h_detr"))
COCO = [p for paths in COCO for p in paths if "Base-" not in p]
SHAPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "shapes", "detr", "*.yaml")) if "Base-" not in p)


def load(path):
    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", COCO + SHAPES, ids=os.path.basename)
def test_config_builds_model(path):
    cfg = load(path)
    # smaller but same variant options: keeps the test fast
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                         "MODEL.DETR.ENC_LAYERS", 1, "MODEL.DETR.DEC_LAYERS", 2])
    model = build_model(cfg)
    assert type(model).__name__ == "DeformableDETR"
    assert model.transformer.num_queries == cfg.MODEL.DETR.NUM_QUERIES


def test_published_settings():
    dino = load(os.path.join(REPO, "configs/coco/dino/dino_R50_4scale_12ep.yaml"))
    d = dino.MODEL.DETR
    assert (d.NUM_QUERIES, d.DN_NUMBER, d.DN_LABEL_NOISE, d.DN_BOX_NOISE) == (900, 100, 0.5, 1.0)
    assert (d.CLASS_COST_WEIGHT, d.BBOX_COST_WEIGHT, d.GIOU_COST_WEIGHT) == (2.0, 5.0, 2.0)
    assert (d.CLASS_WEIGHT, d.BBOX_WEIGHT, d.GIOU_WEIGHT) == (1.0, 5.0, 2.0)
    assert (dino.SOLVER.BASE_LR, dino.SOLVER.BACKBONE_MULTIPLIER, dino.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (1e-4, 0.1, 0.1)
    assert (dino.SOLVER.MAX_ITER, dino.SOLVER.IMS_PER_BATCH) == (90000, 16)
    h = load(os.path.join(REPO, "configs/coco/h_detr/h_detr_R50_two_stage_12ep.yaml")).MODEL.DETR
    assert (h.NUM_QUERIES, h.NUM_QUERIES_ONE2MANY, h.K_ONE2MANY, h.LAMBDA_ONE2MANY) == (300, 1500, 6, 1.0)


def test_code_defaults_equal_deformable_detr_yaml():
    """The two-stage Deformable-DETR yaml only restates code defaults of MODEL.DETR."""
    cfg = get_cfg()
    add_detr_config(cfg)
    shipped = load(os.path.join(REPO, "configs/coco/deformable_detr/deformable_detr_R50_two_stage_50ep.yaml"))
    assert dict(shipped.MODEL.DETR) == dict(cfg.MODEL.DETR)
