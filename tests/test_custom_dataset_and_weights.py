"""Your own COCO json without Python (train_net --dataset, DATASETS.COCO_JSON), the class count
taken from / checked against the data, and MODEL.WEIGHTS that must fit the model."""
import importlib.util
import json
import os
import pickle
import re

import cv2
import numpy as np
import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from conftest import REPO, TINY_CONFIG, captured_logs, make_cfg
from maskfrozen.data.datasets import parse_dataset_flag, register_coco_json, resolve_num_classes
from maskfrozen.engine import Trainer
from maskfrozen.engine.weights import CheckedCheckpointer, WeightsMismatchError

DINO_TINY = os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml")
# non-contiguous COCO category ids, listed out of id order: contiguous ids follow the id order
CATEGORIES = [{"id": 9, "name": "blue"}, {"id": 1, "name": "red"}, {"id": 5, "name": "green"}]


def _load_train_net():
    path = os.path.join(REPO, "tools", "train_net.py")
    spec = importlib.util.spec_from_file_location("maskfrozen_tools_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _load_train_net()


def _square(x: int, y: int, size: int, category_id: int, ann_id: int, image_id: int) -> dict:
    polygon = [x, y, x + size, y, x + size, y + size, x, y + size]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, size, size],
            "area": size * size, "iscrowd": 0, "segmentation": [[float(v) for v in polygon]]}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """3 images (numpy + cv2) with squares of categories 1, 5, 9: (json path, image directory)."""
    root = tmp_path_factory.mktemp("toy_coco")
    (root / "images").mkdir()
    colours = {1: (0, 0, 255), 5: (0, 255, 0), 9: (255, 0, 0)}
    images, annotations = [], []
    for image_id, ids in enumerate([(1, 5), (5, 9), (9, 1)], start=1):
        image = np.full((96, 96, 3), 40, np.uint8)
        for k, category_id in enumerate(ids):
            x = 8 + 44 * k
            cv2.rectangle(image, (x, 20), (x + 36, 56), colours[category_id], -1)
            annotations.append(_square(x, 20, 36, category_id, len(annotations) + 1, image_id))
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), image)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 96, "width": 96})
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return str(json_file), str(root / "images")


def _args(*argv: str):
    return train_net.argument_parser().parse_args(list(argv))


def _class_rows(state: dict) -> set:
    return {tuple(v.shape)[0] for k, v in state.items() if "class_embed" in k and k.endswith(".weight")}


def test_dataset_flag_trains_dino_with_the_json_classes(coco_dir, tmp_path, one_thread):
    json_file, image_root = coco_dir
    args = _args("--config-file", DINO_TINY, "--dataset", f"toy_flag={json_file}:{image_root}",
                 "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()")
    train_net.main(args)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["MODEL"]["DETR"]["NUM_CLASSES"] == 3  # the yaml says 5
    assert saved["DATASETS"]["TRAIN"] == ["toy_flag"] and saved["DATASETS"]["TEST"] == []
    assert saved["DATASETS"]["COCO_JSON"] == [["toy_flag", os.path.abspath(json_file), os.path.abspath(image_root)]]
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu")["model"]
    assert _class_rows(state) == {3}
    meta = MetadataCatalog.get("toy_flag")
    assert meta.thing_classes == ["red", "green", "blue"] and meta.evaluator_type == "coco"
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 5: 1, 9: 2}
    records = {r["image_id"]: [a["category_id"] for a in r["annotations"]] for r in DatasetCatalog.get("toy_flag")}
    assert records == {1: [0, 1], 2: [1, 2], 3: [2, 0]}


def test_single_dataset_flag_is_train_and_test_and_others_are_test(coco_dir, tmp_path):
    json_file, image_root = coco_dir
    cfg = train_net.load_config(DINO_TINY, freeze=False)
    train_net.apply_dataset_args(cfg, [f"toy_a={json_file}:{image_root}"], [])
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.MODEL.NUM_CLASSES_FROM_DATASET) == (("toy_a",), ("toy_a",), True)
    cfg = train_net.load_config(DINO_TINY, freeze=False)
    train_net.apply_dataset_args(cfg, [f"toy_a={json_file}:{image_root}", f"toy_b={json_file}:{image_root}"],
                                 ["MODEL.DETR.NUM_CLASSES", "7"])
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("toy_a",), ("toy_b",))
    assert cfg.MODEL.NUM_CLASSES_FROM_DATASET is False  # the command line sets a count


def test_coco_json_key_builds_mask_rcnn_with_the_json_classes(coco_dir, tmp_path, one_thread):
    json_file, image_root = coco_dir
    cfg = make_cfg(TINY_CONFIG, tmp_path, "DATASETS.COCO_JSON", str([["toy_yaml", json_file, image_root]]),
                   "DATASETS.TRAIN", "('toy_yaml',)", "DATASETS.TEST", "()", "MODEL.NUM_CLASSES_FROM_DATASET", "True")
    trainer = Trainer(cfg)
    assert trainer.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert trainer.model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background


@pytest.mark.parametrize("opts, expected", [
    ([], 5),  # set by the yaml and larger than the data's 3: kept (warning; evaluation drops classes 3, 4)
    (["MODEL.DETR.NUM_CLASSES", "80"], 3),  # the code default counts as unset: filled
    (["MODEL.NUM_CLASSES_FROM_DATASET", "True"], 3),
])
def test_class_count_is_filled_only_where_unset_or_asked(coco_dir, tmp_path, opts, expected):
    json_file, image_root = coco_dir
    register_coco_json("toy_fill", json_file, image_root)
    cfg = resolve_num_classes(make_cfg(DINO_TINY, tmp_path, "DATASETS.TRAIN", "('toy_fill',)", *opts))
    assert cfg.MODEL.DETR.NUM_CLASSES == expected
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3  # detectron2's default 80, unset: filled too
    assert cfg.is_frozen()


def test_dataset_flag_with_too_few_classes_names_key_and_numbers(coco_dir, tmp_path):
    json_file, image_root = coco_dir
    args = _args("--config-file", DINO_TINY, "--dataset", f"toy_flag={json_file}:{image_root}",
                 "OUTPUT_DIR", str(tmp_path), "MODEL.DETR.NUM_CLASSES", "2")
    with pytest.raises(ValueError, match=r"MODEL\.DETR\.NUM_CLASSES is 2 but dataset 'toy_flag' has 3 classes"):
        train_net.setup(args)


def test_mask_rcnn_with_fewer_classes_than_shapes_names_key_and_numbers(tmp_path):
    cfg = make_cfg(TINY_CONFIG, tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "4")
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.NUM_CLASSES is 4 but dataset 'shapes_tiny_train' "
                                         r"has 5 classes.*Set MODEL\.ROI_HEADS\.NUM_CLASSES 5"):
        Trainer.build_model(cfg)


def test_missing_files_and_bad_entries_name_the_source_and_path(coco_dir, tmp_path):
    json_file, image_root = coco_dir
    missing = str(tmp_path / "nope.json")
    expected = re.escape(f"--dataset x={missing}:") + ".*" + re.escape(f"annotation json '{missing}'")
    with pytest.raises(FileNotFoundError, match=expected):
        parse_dataset_flag(f"x={missing}:{image_root}")
    with pytest.raises(ValueError, match="--dataset 'x=only.json': expected NAME=JSON:IMAGE_ROOT .* or NAME"):
        parse_dataset_flag("x=only.json")
    no_dir = str(tmp_path / "no_images")
    cfg = make_cfg(TINY_CONFIG, tmp_path, "DATASETS.COCO_JSON", str([["toy_x", json_file, no_dir]]))
    with pytest.raises(FileNotFoundError, match=re.escape(f"DATASETS.COCO_JSON[0]: image directory '{no_dir}'")):
        Trainer.build_model(cfg)
    cfg = make_cfg(TINY_CONFIG, tmp_path, "DATASETS.COCO_JSON", str([["toy_x", json_file]]))
    with pytest.raises(ValueError, match=r"DATASETS\.COCO_JSON\[0\] = \['toy_x', .*expected \[name, json_file"):
        Trainer.build_model(cfg)


def test_name_registered_with_other_files_is_refused(coco_dir, tmp_path):
    json_file, image_root = coco_dir
    with pytest.raises(ValueError, match="'shapes_tiny_train' is already registered"):
        register_coco_json("shapes_tiny_train", json_file, image_root)


# ----------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def dino_model():
    cfg = make_cfg(DINO_TINY, "unused")
    return cfg, Trainer.build_model(cfg)


def test_eval_only_with_another_configs_checkpoint_names_counts_and_file(dino_model, tmp_path):
    _, dino = dino_model
    rcnn = Trainer.build_model(make_cfg(TINY_CONFIG, tmp_path)).state_dict()
    path = str(tmp_path / "mask_rcnn.pth")
    torch.save({"model": rcnn}, path)
    own = dino.state_dict()
    # torch fills a missing BatchNorm num_batches_tracked itself; detectron2 ignores pixel_mean/std
    missing = {k for k in set(own) - set(rcnn) if not k.endswith("num_batches_tracked")}
    n_missing = len(missing - {"pixel_mean", "pixel_std"})
    n_unexpected = len(set(rcnn) - set(own))
    args = _args("--config-file", DINO_TINY, "--eval-only", "OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.WEIGHTS", path)
    with pytest.raises(WeightsMismatchError) as info:
        train_net.main(args)
    message = str(info.value)
    assert f"checkpoint {path} does not fit the model" in message
    assert f"{n_missing} missing keys" in message and f"{n_unexpected} unexpected keys" in message
    assert "--allow-partial-weights" in message and "MODEL.WEIGHTS_ALLOW_PARTIAL True" in message


def test_checkpoint_of_another_size_names_the_shape_mismatches(dino_model, tmp_path):
    _, dino = dino_model
    path = str(tmp_path / "dino_3_classes.pth")
    other = build_model(make_cfg(DINO_TINY, tmp_path, "MODEL.DETR.NUM_CLASSES", "3"))  # detectron2's: no class check
    torch.save({"model": other.state_dict()}, path)
    own, theirs = dino.state_dict(), other.state_dict()
    n_shapes = sum(own[k].shape != v.shape for k, v in theirs.items())
    with pytest.raises(WeightsMismatchError) as info:
        CheckedCheckpointer(dino).load(path)
    message = str(info.value)
    assert f"does not fit the model {type(dino).__name__}: {n_shapes} shape mismatches (e.g. " in message
    assert "class_embed.0.weight: checkpoint (3, 32) vs model (5, 32)" in message
    assert "missing" not in message and "unexpected" not in message


def test_eval_only_without_weights_is_an_error(tmp_path):
    args = _args("--config-file", TINY_CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="--eval-only with MODEL.WEIGHTS empty"):
        train_net.main(args)


def test_backbone_only_checkpoint_needs_and_honours_the_opt_out(dino_model, tmp_path):
    _, dino = dino_model
    state = dino.state_dict()
    backbone = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items() if k.startswith("backbone.")}
    path = str(tmp_path / "backbone.pth")
    torch.save({"model": backbone}, path)
    with pytest.raises(WeightsMismatchError, match=r"\d+ missing keys .*--allow-partial-weights"):
        CheckedCheckpointer(dino).load(path)
    CheckedCheckpointer(dino, allow_partial=True).load(path)
    loaded = dino.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone.items())


def test_converted_pkl_checkpoint_is_partial_by_nature(dino_model, tmp_path):
    _, dino = dino_model
    arrays = {k: v.numpy() for k, v in dino.state_dict().items() if k.startswith("backbone.")}
    path = str(tmp_path / "R-18.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True}, f)
    with pytest.raises(WeightsMismatchError, match="converted detectron2/ImageNet checkpoint"):
        CheckedCheckpointer(dino).load(path)
    CheckedCheckpointer(dino, allow_partial=True).load(path)


def test_training_start_checks_weights_and_the_flag_opts_out(dino_model, tmp_path, one_thread):
    _, dino = dino_model
    path = str(tmp_path / "backbone_only.pth")
    torch.save({"model": {k: v for k, v in dino.state_dict().items() if k.startswith("backbone.")}}, path)
    argv = ["--config-file", DINO_TINY, "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.WEIGHTS", path,
            "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"]
    with pytest.raises(WeightsMismatchError, match=re.escape(f"checkpoint {path} does not fit")):
        train_net.main(_args(*argv))
    train_net.main(_args("--allow-partial-weights", *argv))
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")


def test_option_after_the_overrides_is_named(tmp_path):
    args = _args("--config-file", DINO_TINY, "OUTPUT_DIR", str(tmp_path), "--dataset", "a=b.json:c")
    with pytest.raises(ValueError, match=r"options \['--dataset'\] come after the KEY VALUE overrides"):
        train_net.setup(args)


def test_dataset_classes_on_a_coco_detr_config_switch_to_contiguous_class_rows(coco_dir, tmp_path):
    """The COCO DETR yamls have a class-head row per COCO category id (91 rows); filled from a
    dataset, the count becomes the dataset's and the rows its contiguous classes."""
    json_file, image_root = coco_dir
    register_coco_json("toy_rows", json_file, image_root)
    coco_dino = os.path.join(REPO, "configs", "coco", "dino", "dino_R50_4scale_12ep.yaml")
    cfg = resolve_num_classes(make_cfg(coco_dino, tmp_path, "DATASETS.TRAIN", "('toy_rows',)",
                                       "MODEL.NUM_CLASSES_FROM_DATASET", "True"))
    assert (cfg.MODEL.DETR.NUM_CLASSES, cfg.MODEL.DETR.CLASS_ROWS) == (3, "contiguous")
    with captured_logs("maskfrozen") as messages:
        kept = resolve_num_classes(make_cfg(coco_dino, tmp_path, "DATASETS.TRAIN", "('toy_rows',)"))
    assert (kept.MODEL.DETR.NUM_CLASSES, kept.MODEL.DETR.CLASS_ROWS) == (91, "coco_category_id")
    # the rows are category ids, mapped to the dataset's classes: no "extra class outputs ... dropped" warning
    assert not any("extra class outputs" in m for m in messages)
    assert any("class-head rows are category ids" in m for m in messages)
