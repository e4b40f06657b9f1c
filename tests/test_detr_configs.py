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
    assert type(model).__name__ == "DeformableDETRFamily"
    assert model.transformer.num_queries == cfg.MODEL.DETR.NUM_QUERIES


def test_published_settings():
    """The official DINO_4scale.py / H-DETR 12-epoch script values."""
    dino = load(os.path.join(REPO, "configs/coco/dino/dino_R50_4scale_12ep.yaml"))
    d = dino.MODEL.DETR
    assert (d.NUM_QUERIES, d.DN_NUMBER, d.DN_LABEL_NOISE, d.DN_BOX_NOISE) == (900, 100, 0.5, 0.4)
    assert (d.POSITION_TEMPERATURE, d.POSITION_OFFSET, dino.TEST.DETECTIONS_PER_IMAGE) == (20.0, 0.0, 300)
    assert (d.SHARE_DECODER_HEADS, d.INVERSE_SIGMOID_EPS, d.ENC_LOSS_TOKENS, d.QUERY_POS_REFERENCE) == \
        (True, 1e-3, "selected", "level0")
    assert (d.NUM_CLASSES, d.CLASS_ROWS, d.SIZE_DIVISIBILITY, d.LEVEL_MASKS) == (91, "coco_category_id", 0, "interpolate")
    assert load(os.path.join(REPO, "configs/coco/dino/dino_R50_4scale_24ep.yaml")).MODEL.DETR == d
    assert (d.CLASS_COST_WEIGHT, d.BBOX_COST_WEIGHT, d.GIOU_COST_WEIGHT) == (2.0, 5.0, 2.0)
    assert (d.CLASS_WEIGHT, d.BBOX_WEIGHT, d.GIOU_WEIGHT) == (1.0, 5.0, 2.0)
    assert (dino.SOLVER.BASE_LR, dino.SOLVER.BACKBONE_MULTIPLIER, dino.SOLVER.CLIP_GRADIENTS.CLIP_VALUE) == (1e-4, 0.1, 0.1)
    assert (dino.SOLVER.MAX_ITER, dino.SOLVER.IMS_PER_BATCH) == (90000, 16)
    h = load(os.path.join(REPO, "configs/coco/h_detr/h_detr_R50_two_stage_12ep.yaml")).MODEL.DETR
    assert (h.NUM_QUERIES, h.NUM_QUERIES_ONE2MANY, h.K_ONE2MANY, h.LAMBDA_ONE2MANY) == (300, 1500, 6, 1.0)
    assert (h.POSITION_OFFSET, h.ENC_LOSS_TOKENS, h.SHARE_DECODER_HEADS, h.INVERSE_SIGMOID_EPS) == (-0.5, "all", False, 1e-5)


def test_dino_config_shares_its_decoder_heads():
    """One class / box head for the 6 decoder layers + the encoder head (official DINO)."""
    cfg = load(os.path.join(REPO, "configs/coco/dino/dino_R50_4scale_12ep.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                         "MODEL.DETR.ENC_LAYERS", 1, "MODEL.DETR.HIDDEN_DIM", 32, "MODEL.DETR.NUM_QUERIES", 10])
    t = build_model(cfg).transformer
    assert len(t.class_embed) == len(t.bbox_embed) == 2 and [t.head_of_layer(i) for i in range(6)] == [0] * 6
    assert t.class_embed[0].out_features == 91


def test_code_defaults_equal_deformable_detr_yaml():
    """The two-stage Deformable-DETR yaml only restates code defaults of MODEL.DETR, but for
    the COCO class rows (the code default stays a dataset's contiguous classes)."""
    cfg = get_cfg()
    add_detr_config(cfg)
    shipped = load(os.path.join(REPO, "configs/coco/deformable_detr/deformable_detr_R50_two_stage_50ep.yaml"))
    coco_rows = {"NUM_CLASSES": 91, "CLASS_ROWS": "coco_category_id"}
    assert dict(shipped.MODEL.DETR) == {**dict(cfg.MODEL.DETR), **coco_rows}


def test_any_width_resnet_matches_detectron2_and_narrows():
    """build_resnet_any_width_backbone = detectron2's R18 at width 64 (same parameter
    names and shapes), and honours a narrower RES2_OUT_CHANNELS (stage widths doubling)."""
    import torch
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from maskfrozen.modeling.backbone import build_resnet_any_width_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    ours = build_resnet_any_width_backbone(cfg, ShapeSpec(channels=3))
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    narrow = build_resnet_any_width_backbone(cfg, ShapeSpec(channels=3)).eval()
    shapes = narrow.output_shape()
    assert [(shapes[f].channels, shapes[f].stride) for f in ("res3", "res4", "res5")] == [(64, 8), (128, 16), (256, 32)]
    out = narrow(torch.zeros(1, 3, 64, 96))
    assert tuple(out["res5"].shape) == (1, 256, 2, 3)

    cfg.MODEL.RESNETS.RES5_DILATION = 2
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_resnet_any_width_backbone(cfg, ShapeSpec(channels=3))


def test_former_meta_arch_name_still_builds_the_family(tmp_path):
    """Configs that name the meta-arch by its former name ("DeformableDETR") load and
    build the same model (an alias subclass); its state_dict keys are unchanged."""
    from maskfrozen.modeling.detr import DeformableDETRFamily

    cfg = load(os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml"))
    new = build_model(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    old = build_model(cfg)
    assert isinstance(old, DeformableDETRFamily) and type(old).__name__ == "DeformableDETR"
    assert old.state_dict().keys() == new.state_dict().keys()
