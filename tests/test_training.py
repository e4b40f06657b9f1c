"""End-to-end on the tiny shapes config: train, resume, evaluate, predict, demo, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor

from conftest import REPO, TINY_CONFIG, make_cfg
from maskfrozen.data import ImageReadError
from maskfrozen.engine import Trainer


def test_training_iteration_changes_weights_and_logs_losses(trained_tiny):
    cfg, weights = trained_tiny
    init = Trainer.build_model(cfg).state_dict()
    trained = torch.load(weights, map_location="cpu")
    assert trained["iteration"] == cfg.SOLVER.MAX_ITER - 1
    changed = [k for k, v in trained["model"].items() if v.dtype.is_floating_point and not torch.equal(v, init[k])]
    assert any(k.startswith("backbone.bottom_up") for k in changed)
    assert any(k.startswith("roi_heads.mask_head") for k in changed)
    metrics = [json.loads(line) for line in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    losses = [m for m in metrics if "total_loss" in m]
    assert losses and all(np.isfinite(m["total_loss"]) for m in losses)


def test_resume_continues_at_the_saved_iteration(tmp_path):
    first = make_cfg(TINY_CONFIG, tmp_path, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    trainer = Trainer(first)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    # the run is "interrupted" after 2 iterations; a longer schedule resumes at iteration 2
    longer = make_cfg(TINY_CONFIG, tmp_path, "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()")
    resumed = Trainer(longer)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed.scheduler.last_epoch == 2
    resumed.train()
    assert resumed.iter == 3  # detectron2 leaves iter == max_iter after the loop
    assert torch.load(tmp_path / "model_final.pth", map_location="cpu")["iteration"] == 2


def test_predictor_returns_instances_at_input_size(trained_tiny):
    cfg, weights = trained_tiny
    predict_cfg = cfg.clone()
    predict_cfg.defrost()
    predict_cfg.MODEL.WEIGHTS = weights
    predict_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model scores low
    predictor = DefaultPredictor(predict_cfg)
    image = np.random.RandomState(0).randint(0, 255, (97, 150, 3), dtype=np.uint8)
    instances = predictor(image)["instances"]
    assert instances.image_size == (97, 150)
    assert {"pred_masks", "pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
    assert len(instances) > 0
    assert instances.pred_masks.shape[1:] == (97, 150)
    assert instances.pred_masks.dtype == torch.bool


def test_eval_only_prints_coco_tables(trained_tiny):
    cfg, weights = trained_tiny
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", TINY_CONFIG, "--eval-only",
         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.join(cfg.OUTPUT_DIR, "eval"),
         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log


def test_demo_writes_overlay_pngs(trained_tiny, tmp_path):
    import cv2

    from tools_demo import demo_main

    cfg, weights = trained_tiny
    images = [d["file_name"] for d in DatasetCatalog.get("shapes_tiny_val")][:2]
    written = demo_main(["--config-file", TINY_CONFIG, "--input", *images, "--output", str(tmp_path),
                         "MODEL.WEIGHTS", weights])
    assert [os.path.basename(p) for p in written] == [os.path.splitext(os.path.basename(i))[0] + ".png" for i in images]
    overlay, original = cv2.imread(written[0]), cv2.imread(images[0])
    assert overlay.shape == original.shape


@pytest.mark.parametrize("content, message", [(None, "cannot read image"), (b"not an image", "cannot read image")])
def test_unreadable_image_names_the_file(tmp_path, content, message):
    from maskfrozen.data.mappers import build_mapper

    cfg = make_cfg(TINY_CONFIG, tmp_path)
    record = dict(DatasetCatalog.get("shapes_tiny_train")[0])
    record["file_name"] = str(tmp_path / "broken.png")
    if content is not None:
        (tmp_path / "broken.png").write_bytes(content)
    with pytest.raises(ImageReadError, match=f"{message}.*broken.png"):
        build_mapper(cfg, is_train=True)(record)


def test_grayscale_image_is_read_as_three_channels(tmp_path):
    import cv2

    from maskfrozen.data.mappers import build_mapper

    cfg = make_cfg(TINY_CONFIG, tmp_path)
    record = dict(DatasetCatalog.get("shapes_tiny_train")[0])
    gray = cv2.cvtColor(cv2.imread(record["file_name"]), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    record["file_name"] = str(tmp_path / "gray.png")
    out = build_mapper(cfg, is_train=False)(record)
    assert out["image"].shape[0] == 3
    assert torch.equal(out["image"][0], out["image"][1])


def test_unknown_config_key_and_dataset_are_named(tmp_path):
    with pytest.raises(KeyError, match="MODEL.NOT_A_KEY"):
        make_cfg(TINY_CONFIG, tmp_path, "MODEL.NOT_A_KEY", "1")
    cfg = make_cfg(TINY_CONFIG, tmp_path, "DATASETS.TRAIN", "('no_such_dataset',)")
    with pytest.raises(KeyError, match="no_such_dataset"):
        Trainer.build_train_loader(cfg)


def test_unknown_mapper_is_named(tmp_path):
    cfg = make_cfg(TINY_CONFIG, tmp_path, "INPUT.DATASET_MAPPER_NAME", "nope")
    with pytest.raises(KeyError, match="DATASET_MAPPER_NAME='nope'"):
        Trainer.build_train_loader(cfg)
