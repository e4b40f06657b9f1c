"""Backbone pretraining on the shapes (tools/pretrain_backbone.py) and backbone-only MODEL.WEIGHTS:
the step learns, the file fills exactly the ResNet of every recipe's model (``backbone.*`` or an
FPN's ``backbone.bottom_up.*``) and nothing else, and the errors name their cause."""
import glob
import os
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from detectron2.config import get_cfg

from conftest import REPO, make_cfg
from maskfrozen.engine import Trainer
from maskfrozen.engine.backbone_pretrain import load_pretrain_config, pretrain_backbone
from maskfrozen.engine.weights import (BACKBONE_ONLY, CheckedCheckpointer, WeightsMismatchError, backbone_resnet,
                                       require_eval_weights, save_backbone_checkpoint)
from maskfrozen.data.crops import ObjectCropMapper, crop_extent
from maskfrozen.modeling.backbone_pretrain import add_backbone_pretrain_config

sys.path.insert(0, os.path.join(REPO, "tools"))
import pretrain_backbone as tool  # noqa: E402

PRETRAIN = os.path.join(REPO, "configs", "shapes", "pretrain", "R18_half.yaml")
PRETRAIN_TINY = os.path.join(REPO, "configs", "shapes", "pretrain", "R18_half_tiny.yaml")
SHAPES = os.path.join(REPO, "configs", "shapes")
M2F_TINY = os.path.join(SHAPES, "mask2former", "maskformer2_R18_tiny.yaml")
SOTR_TINY = os.path.join(SHAPES, "sotr", "sotr_R18_tiny.yaml")
# the recipes that start from the pretrained backbone by default, and their tiny test configs that do not
RECIPES = ["mask2former/maskformer2_R18.yaml", "fastinst/fastinst_R18_D3.yaml", "fastinst/fastinst_R18_D1.yaml",
           "sotr/sotr_R18.yaml", "detr/dino_R18.yaml", "detr/deformable_detr_R18.yaml", "detr/h_detr_R18.yaml",
           "co_detr/co_dino_R18.yaml"]
TINY = [p for p in glob.glob(os.path.join(SHAPES, "**", "*_tiny.yaml"), recursive=True) if "/pretrain/" not in p]


def _pretrainer(config=PRETRAIN_TINY, *opts):
    return Trainer.build_model(load_pretrain_config(config, opts))


def _backbone_file(tmp_path, model, name="backbone.pth", **meta):
    """A backbone-only file of ``model``'s ResNet with every float tensor moved off its current value."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in backbone_resnet(model)[1].state_dict().values():
            if p.is_floating_point():
                p.add_(torch.rand_like(p) + 0.5)
    path = str(tmp_path / name)
    save_backbone_checkpoint(model, path, {"config": "test", "pixel_mean": model.pixel_mean.flatten().tolist(),
                                           "pixel_std": model.pixel_std.flatten().tolist(), **meta})
    return path


# ----------------------------------------------------------------------------- the pretraining step
def test_crops_are_the_squares_around_the_boxes(tmp_path):
    """Context 1: the crop of a box is its own pixels resized; training jitter moves it by at most
    the configured fractions; labels are the contiguous classes."""
    image = np.zeros((100, 120, 3), np.uint8)
    image[20:60, 30:50] = (10, 200, 30)  # a 20 x 40 (w x h) box at x 30, y 20
    image[20:60, 50:70] = (0, 0, 250)  # its right neighbour, inside the square crop of context 1
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, image)
    cfg = load_pretrain_config(PRETRAIN, ["BACKBONE_PRETRAIN.CROP_CONTEXT", "1.0", "BACKBONE_PRETRAIN.CROP_SIZE", "32"])
    item = {"file_name": path, "bbox": [30.0, 20.0, 20.0, 40.0], "label": 3, "height": 100, "width": 120}
    assert crop_extent(item["bbox"], 1.3) == pytest.approx([14.0, 14.0, 66.0, 66.0])  # side 1.3 x 40 around (40, 40)
    crop = ObjectCropMapper(cfg, is_train=False)(item)
    assert crop["label"] == 3 and crop["image"].shape == (3, 32, 32) and crop["image"].dtype == torch.uint8
    # square 40 x 40 from x 20: left quarter black, then the green box, then the red neighbour
    assert crop["image"][:, 16, 12].tolist() == [10, 200, 30] and crop["image"][:, 16, 28].tolist() == [0, 0, 250]
    assert crop["image"][:, 16, 2].tolist() == [0, 0, 0]
    np.random.seed(0)
    jittered = ObjectCropMapper(cfg, is_train=True)(item)["image"]
    assert jittered.shape == (3, 32, 32) and not torch.equal(jittered, crop["image"])


def test_pretraining_learns_the_classes_and_writes_the_backbone(tmp_path, one_thread):
    """A few batches of shapes_tiny's crops lift the accuracy on them far above the chance level of
    5 classes (20%); the file holds exactly the ResNet's tensors and its metadata."""
    out = tmp_path / "b.pth"
    cfg = load_pretrain_config(PRETRAIN_TINY, ["OUTPUT_DIR", str(tmp_path / "run"), "BACKBONE_PRETRAIN.OUTPUT", str(out),
                                               "DATASETS.TEST", "('shapes_tiny_train',)"])
    meta = pretrain_backbone(cfg, PRETRAIN_TINY)
    assert meta["val_accuracy"] >= 50.0, meta["val_accuracy"]  # chance: 20%; 69.8 measured
    saved = torch.load(out, weights_only=True)
    resnet = backbone_resnet(_pretrainer())[1]
    assert {k: tuple(v.shape) for k, v in saved["model"].items()} == \
        {k: tuple(v.shape) for k, v in resnet.state_dict().items()}
    assert saved[BACKBONE_ONLY]["val_accuracy"] == meta["val_accuracy"] and saved["matching_heuristics"]
    assert saved[BACKBONE_ONLY]["pixel_std"] == list(cfg.MODEL.PIXEL_STD)
    # an output pretrained with the same config is reused, not retrained
    assert pretrain_backbone(cfg, PRETRAIN_TINY)["train_seconds"] == meta["train_seconds"]


def test_pretraining_is_deterministic_given_the_seed(tmp_path, one_thread):
    files = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.pth"
        tool.main(tool.parse_args(["--config-file", PRETRAIN_TINY, "OUTPUT_DIR", str(tmp_path / run),
                                   "BACKBONE_PRETRAIN.OUTPUT", str(out), "SOLVER.MAX_ITER", "3",
                                   "DATASETS.TEST", "()"]))
        files.append(torch.load(out, weights_only=True)["model"])
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_code_defaults_equal_the_shipped_pretraining_yaml():
    cfg = get_cfg()
    add_backbone_pretrain_config(cfg)
    with open(PRETRAIN) as f:
        shipped = yaml.safe_load(f)["BACKBONE_PRETRAIN"]
    assert {k: v for k, v in cfg.BACKBONE_PRETRAIN.items()} == shipped


# ----------------------------------------------------------------------------- the recipes start from it
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_names_the_pretrained_backbone_with_the_same_keys_and_shapes(recipe):
    cfg = make_cfg(os.path.join(SHAPES, recipe), "unused")
    pretrain = load_pretrain_config(PRETRAIN)
    assert cfg.MODEL.WEIGHTS == pretrain.BACKBONE_PRETRAIN.OUTPUT
    assert (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD) == (pretrain.MODEL.PIXEL_MEAN, pretrain.MODEL.PIXEL_STD)
    ours = backbone_resnet(Trainer.build_model(cfg))[1].state_dict()
    theirs = backbone_resnet(_pretrainer(PRETRAIN))[1].state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("tiny", TINY, ids=os.path.basename)
def test_tiny_configs_need_no_pretrained_file(tiny):
    assert make_cfg(tiny, "unused").MODEL.WEIGHTS == ""


@pytest.mark.parametrize("config, prefix", [(M2F_TINY, "backbone."), (SOTR_TINY, "backbone.bottom_up.")],
                         ids=["mask2former", "sotr_fpn"])
def test_backbone_only_file_fills_exactly_the_resnet(tmp_path, config, prefix):
    model = Trainer.build_model(make_cfg(config, tmp_path))
    width = str(backbone_resnet(model)[1].stem.out_channels)
    source = _pretrainer(PRETRAIN_TINY, "MODEL.RESNETS.STEM_OUT_CHANNELS", width, "MODEL.RESNETS.RES2_OUT_CHANNELS", width)
    path = _backbone_file(tmp_path, source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    CheckedCheckpointer(model).load(path)
    after, loaded = model.state_dict(), torch.load(path, weights_only=True)["model"]
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    floats = {prefix + k for k, v in loaded.items() if v.is_floating_point()}
    assert changed == floats  # every float tensor of the ResNet (all moved off), nothing else
    assert all(torch.equal(after[prefix + k], v) for k, v in loaded.items())


# ----------------------------------------------------------------------------- errors
def test_missing_pretrained_file_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative output path, absent here
    model = Trainer.build_model(make_cfg(M2F_TINY, tmp_path))
    path = load_pretrain_config(PRETRAIN).BACKBONE_PRETRAIN.OUTPUT
    with pytest.raises(FileNotFoundError) as info:
        CheckedCheckpointer(model).load(path)
    message = str(info.value)
    assert f"checkpoint {path} (MODEL.WEIGHTS) does not exist" in message
    assert "make pretrain" in message and "tools/pretrain_backbone.py --config-file configs/shapes/pretrain/R18_half.yaml" in message
    assert 'MODEL.WEIGHTS ""' in message


def test_backbone_of_another_width_eval_mode_and_eval_only_are_errors(tmp_path):
    cfg = make_cfg(M2F_TINY, tmp_path)
    model = Trainer.build_model(cfg)
    wide = _backbone_file(tmp_path, _pretrainer(PRETRAIN_TINY, "MODEL.RESNETS.STEM_OUT_CHANNELS", "64",
                                                "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"), "wide.pth")
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(e.g. backbone\.res2\.0\.conv1\.norm\.bias: "
                                                   r"checkpoint \(64,\) vs model \(32,\).*backbone-only pretrained"):
        CheckedCheckpointer(model).load(wide)
    fits = _backbone_file(tmp_path, _pretrainer(PRETRAIN_TINY, "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
                                                "MODEL.RESNETS.RES2_OUT_CHANNELS", "32"), "fits.pth")
    with pytest.raises(WeightsMismatchError, match="backbone-only pretrained checkpoint, the start of a training run"):
        CheckedCheckpointer(model.eval()).load(fits)
    cfg = make_cfg(M2F_TINY, tmp_path, "MODEL.WEIGHTS", fits)
    with pytest.raises(ValueError, match="--eval-only with MODEL.WEIGHTS .* a backbone-only pretrained checkpoint"):
        require_eval_weights(cfg, CheckedCheckpointer(model, str(tmp_path)), resume=False)
