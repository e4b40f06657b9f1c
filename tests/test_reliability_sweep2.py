"""Second reliability sweep (issue 24): a class count above the data's evaluates, one meaning
of --dataset in train_net.py and demo.py, no training over another run, unreadable checkpoints
named, train/test class lists, config keys checked at start-up (before any training), bad data
refused at start-up, and a first screen free of torch.jit.script warnings."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from detectron2.modeling import build_model

from conftest import REPO, TINY_CONFIG, captured_logs, make_cfg
from maskfrozen.checkpoint.loading import CheckpointFormatError
from maskfrozen.config import check_config, load_config
from maskfrozen.data.datasets import parse_dataset_flag, register_coco_json
from maskfrozen.engine import Trainer
from maskfrozen.engine.weights import CheckedCheckpointer
from tools_demo import demo_main

DINO_TINY = os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml")
M2F_TINY = os.path.join(REPO, "configs", "shapes", "mask2former", "maskformer2_R18_tiny.yaml")
SOTR_TINY = os.path.join(REPO, "configs", "shapes", "sotr", "sotr_R18_tiny.yaml")


def _load_train_net():
    spec = importlib.util.spec_from_file_location("maskfrozen_tools_train_net_sweep2",
                                                  os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_net = _load_train_net()


def _args(*argv: str):
    return train_net.argument_parser().parse_args(list(argv))


def write_toy_coco(root, names=("red", "green"), masks: bool = True):
    """4 images of 96 px with two squares each, categories ids 1..len(names): the json path."""
    os.makedirs(root / "images", exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, 5):
        image = np.full((96, 96, 3), 40, np.uint8)
        for k in range(2):
            x, category = 8 + 44 * k, 1 + (image_id + k) % len(names)
            cv2.rectangle(image, (x, 20), (x + 36, 56), (0, 60 * category, 255), -1)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                   "bbox": [x, 20, 36, 36], "area": 1296}
            if masks:
                ann["segmentation"] = [[x, 20, x + 36, 20, x + 36, 56, x, 56]]
            annotations.append(ann)
        cv2.imwrite(str(root / "images" / f"{image_id}.png"), image)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 96, "width": 96})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(root / "ann.json")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2-class COCO json and its images: (json, image root)."""
    root = tmp_path_factory.mktemp("toy2")
    return write_toy_coco(root), str(root / "images")


def _snapshot(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


# ---- 1. a class count above the data's: trained, evaluated (the yaml COCO_JSON route) ---------

def test_yaml_coco_json_route_with_extra_classes_trains_and_evaluates(toy, tmp_path, one_thread):
    json_file, image_root = toy
    config = tmp_path / "my_dino.yaml"
    config.write_text(yaml.safe_dump({
        "_BASE_": DINO_TINY,  # MODEL.DETR.NUM_CLASSES 5, the data has 2
        "DATASETS": {"COCO_JSON": [["toy_extra", json_file, image_root]], "TRAIN": ["toy_extra"],
                     "TEST": ["toy_extra"]}}))
    with captured_logs("maskfrozen") as messages:
        train_net.main(_args("--config-file", str(config), "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.MAX_ITER", "1"))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    assert math.isfinite(metrics[-1]["bbox/AP"])  # was: AssertionError in COCOEvaluator after training
    assert any("MODEL.DETR.NUM_CLASSES is 5 but dataset 'toy_extra' has 2 classes: the 3 extra class outputs are "
               "never trained, and evaluation drops predictions of them (classes 2..4)" in m for m in messages)
    # 20 queries x 5 classes = 100 (query, class) pairs per image, all reported; classes 2..4: 60 per image
    assert any("toy_extra: dropped 240 predictions of classes >= 2" in m for m in messages)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["MODEL"]["DETR"]["NUM_CLASSES"] == 5


# ---- 2. --dataset: one meaning in both tools ---------------------------------------------------

def test_demo_dataset_on_a_training_runs_config(toy, tmp_path):
    """A run's config.yaml records its datasets in DATASETS.COCO_JSON; ``--dataset NAME`` finds
    them (they used to be looked up before the config registered them: KeyError)."""
    json_file, image_root = toy
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(DINO_TINY, ["DATASETS.COCO_JSON", str([["toy_run_val", json_file, image_root]]),
                                  "DATASETS.TRAIN", "('toy_run_val',)", "DATASETS.TEST", "('toy_run_val',)",
                                  "MODEL.DETR.NUM_CLASSES", "2", "OUTPUT_DIR", str(run)])
    (run / "config.yaml").write_text(cfg.dump())
    torch.save({"model": build_model(cfg).state_dict()}, run / "model_final.pth")  # registers nothing
    common = ["--config-file", str(run / "config.yaml"), "--confidence-threshold", "0.0"]
    weights = ["MODEL.WEIGHTS", str(run / "model_final.pth")]
    written = demo_main(common + ["--dataset", "toy_run_val", "--output", str(tmp_path / "a")] + weights)
    assert sorted(os.path.basename(p) for p in written) == ["1.png", "2.png", "3.png", "4.png"]
    # NAME=JSON:IMAGE_ROOT in the demo too
    written = demo_main(common + ["--dataset", f"toy_demo_new={json_file}:{image_root}", "--max-images", "2",
                                  "--output", str(tmp_path / "b")] + weights)
    assert len(written) == 2 and all(os.path.isfile(p) for p in written)


def test_dataset_flag_forms_and_errors_in_both_tools(toy, tmp_path, capsys):
    json_file, image_root = toy
    cfg = load_config(DINO_TINY, freeze=False)
    names = train_net.apply_dataset_args(cfg, ["shapes_tiny_val", f"toy_pair={json_file}:{image_root}"], [])
    assert names == ["shapes_tiny_val", "toy_pair"]  # a registered NAME in train_net.py too
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("shapes_tiny_val",), ("toy_pair",))
    assert [entry[0] for entry in cfg.DATASETS.COCO_JSON] == ["toy_pair"]
    with pytest.raises(KeyError, match=r"--dataset nope: dataset 'nope' is not registered.*--dataset nope=JSON:"):
        parse_dataset_flag("nope")
    with pytest.raises(SystemExit):
        demo_main(["--config-file", DINO_TINY, "--dataset", "nope", "--output", str(tmp_path / "o"),
                   "--allow-random-weights"])
    assert "--dataset nope: dataset 'nope' is not registered" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dataset_flag_unused_by_train_and_test_is_a_warning(toy, tmp_path):
    json_file, image_root = toy
    args = _args("--config-file", DINO_TINY, "--dataset", f"toy_used={json_file}:{image_root}",
                 "--dataset", f"toy_unused={json_file}:{image_root}", "OUTPUT_DIR", str(tmp_path),
                 "DATASETS.TRAIN", "('toy_used',)", "DATASETS.TEST", "('toy_used',)")
    with captured_logs("maskfrozen") as messages:
        train_net.setup(args)
    assert [m for m in messages if m.startswith("--dataset")] == [
        "--dataset toy_unused: neither DATASETS.TRAIN ['toy_used'] nor DATASETS.TEST ['toy_used'] (set on the "
        "command line) uses it, so it is neither trained on nor evaluated (nor validated)"]


# ---- 3. no training over another run -----------------------------------------------------------

def _old_run(directory):
    directory.mkdir()
    (directory / "model_final.pth").write_bytes(b"the old run's weights")
    (directory / "metrics.json").write_text('{"iteration": 3749}\n')
    (directory / "last_checkpoint").write_text("model_final.pth")


def test_training_into_another_runs_output_dir_is_refused_before_writing(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    before = _snapshot(run)
    with pytest.raises(FileExistsError) as info:
        train_net.main(_args("--config-file", DINO_TINY, "OUTPUT_DIR", str(run)))
    message = str(info.value)
    for part in (f"OUTPUT_DIR {run} already holds a training run", "last_checkpoint names 'model_final.pth'",
                 "--resume", f"another OUTPUT_DIR (e.g. OUTPUT_DIR {run}_2)", "--overwrite"):
        assert part in message
    assert _snapshot(run) == before  # no config.yaml, no log.txt, nothing replaced
    with pytest.raises(ValueError, match="--resume continues the run in OUTPUT_DIR and --overwrite starts a new one"):
        train_net.main(_args("--resume", "--overwrite", "--config-file", DINO_TINY, "OUTPUT_DIR", str(run)))


def test_overwrite_flag_starts_a_new_run_in_the_folder(tmp_path, one_thread):
    run = tmp_path / "run"
    _old_run(run)
    train_net.main(_args("--overwrite", "--config-file", DINO_TINY, "OUTPUT_DIR", str(run),
                         "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"))
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    assert torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["iteration"] == 0  # new run


# ---- 9, 14. unreadable checkpoints name the file ------------------------------------------------

@pytest.mark.parametrize("name, content, expected", [
    ("empty.pth", b"", r"checkpoint '.*empty\.pth' is empty \(0 bytes\); expected a checkpoint written by torch\.save"),
    ("random.pth", b"\x13\x37 not a checkpoint", r"'.*random\.pth' is not a torch checkpoint: it starts with"),
    ("random.pkl", b"\x80\x04 garbage bytes", r"cannot read checkpoint '.*random\.pkl' \(UnpicklingError: .*\): the "
                                              r"file is damaged or not a detectron2 / Caffe2 model pickle"),
    ("empty.pkl", b"", r"checkpoint '.*empty\.pkl' is empty \(0 bytes\); expected a detectron2 / Caffe2 model pickle"),
])
def test_unreadable_weights_name_the_file_and_what_was_expected(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=expected):
        CheckedCheckpointer(torch.nn.Linear(2, 2)).load(str(path))


def test_resume_from_a_truncated_last_checkpoint_says_how_to_go_on(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = CheckedCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000999")
    checkpointer.save("model_final")
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # killed mid-copy, disk full, ...
    with pytest.raises(CheckpointFormatError) as info:
        CheckedCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    message = str(info.value)
    assert f"cannot read checkpoint '{final}' (" in message and "the file is damaged" in message
    assert (f"to resume from the previous one, write 'model_0000999.pth' into {tmp_path / 'last_checkpoint'} and run "
            f"with --resume again; or delete {final}") in message


# ---- 7. train and test class lists --------------------------------------------------------------

def test_train_and_test_with_different_class_lists_name_both(toy, tmp_path):
    json_file, image_root = toy
    other = write_toy_coco(tmp_path, names=("red", "blue"))
    register_coco_json("toy_rg", json_file, image_root)
    register_coco_json("toy_rb", other, str(tmp_path / "images"))
    cfg = make_cfg(DINO_TINY, tmp_path, "DATASETS.TRAIN", "('toy_rg',)", "DATASETS.TEST", "('toy_rb',)")
    expected = (r"DATASETS.TRAIN dataset 'toy_rg' and DATASETS.TEST dataset 'toy_rb' have different class lists "
                r"\(class 1 is 'green' vs 'blue'\): 'toy_rg': \['red', 'green'\] \(2 classes\); 'toy_rb': "
                r"\['red', 'blue'\] \(2 classes\)")
    with pytest.raises(ValueError, match=expected):
        Trainer.build_model(cfg)


# ---- 13. a mask model's training annotations without segmentation: refused at start-up ----------

def test_mask2former_on_boxes_only_data_names_annotation_file_and_key(tmp_path):
    json_file = write_toy_coco(tmp_path, masks=False)
    entry = [["toy_boxes", json_file, str(tmp_path / "images")]]
    cfg = make_cfg(M2F_TINY, tmp_path / "out", "DATASETS.COCO_JSON", str(entry), "DATASETS.TRAIN", "('toy_boxes',)",
                   "DATASETS.TEST", "()")
    expected = (f"{json_file}: 8 invalid annotation(s):\n  annotation id 1 (image_id 1): no 'segmentation' key, but "
                "the model trains on masks (MODEL.MASK_ON True)")
    with pytest.raises(ValueError) as info:
        Trainer(cfg)
    assert str(info.value).startswith(expected)
    assert not os.path.exists(tmp_path / "out")


def test_bad_test_json_stops_training_at_start_up(toy, tmp_path):
    """A broken DATASETS.TEST json is found before the first iteration, not after training."""
    json_file, image_root = toy
    broken = tmp_path / "val.json"
    broken.write_text(open(json_file).read().replace('"bbox": [52, 20, 36, 36]', '"bbox": [152, 20, 36, 36]', 1))
    cfg = make_cfg(DINO_TINY, tmp_path / "out", "DATASETS.COCO_JSON",
                   str([["toy_good", json_file, image_root], ["toy_outside", str(broken), image_root]]),
                   "DATASETS.TRAIN", "('toy_good',)", "DATASETS.TEST", "('toy_outside',)")
    with pytest.raises(ValueError, match=r"(?s)val\.json: 1 invalid annotation.*annotation id 2 \(image_id 1\): bbox "
                                         r"\[152, 20, 36, 36\] lies entirely outside its image"):
        Trainer(cfg)


# ---- config keys checked at start-up ------------------------------------------------------------

@pytest.mark.parametrize("config, arch", [(TINY_CONFIG, "GeneralizedRCNN"), (SOTR_TINY, "SOTR")])
def test_zero_detections_per_image_is_refused_for_every_family(tmp_path, config, arch):
    cfg = make_cfg(config, tmp_path, "TEST.DETECTIONS_PER_IMAGE", "0")
    with pytest.raises(ValueError, match=rf"TEST.DETECTIONS_PER_IMAGE must be >= 1 .*got 0 \(MODEL.META_ARCHITECTURE "
                                         rf"'{arch}'\)"):
        Trainer.build_model(cfg)


def test_co_detr_on_a_non_detr_model_is_refused(tmp_path):
    cfg = make_cfg(M2F_TINY, tmp_path, "MODEL.CO_DETR.ENABLED", "True")
    with pytest.raises(ValueError, match=r"MODEL.CO_DETR.ENABLED is True but MODEL.META_ARCHITECTURE 'QuerySegmentor' "
                                         r"is not a DETR-family detector.*'DeformableDETRFamily'.*Set "
                                         r"MODEL.CO_DETR.ENABLED False"):
        Trainer.build_model(cfg)
    mask_frozen = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "co_dino_R18.yaml")
    check_config(make_cfg(mask_frozen, tmp_path))  # Mask Frozen-DETR on a Co-DINO detector: accepted
    with pytest.raises(ValueError, match=r"'MaskFrozenDETR' \(its detector 'QuerySegmentor'\)"):
        check_config(make_cfg(mask_frozen, tmp_path, "MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE", "QuerySegmentor"))


# ---- 12. the first screen ------------------------------------------------------------------------

def test_command_line_start_prints_no_torch_jit_script_warning():
    """Silenced during detectron2's import only: no filter stays behind (the test process's own
    pytest.ini filter would hide one, hence a fresh interpreter)."""
    code = ("import runpy, sys, warnings\nsys.argv = ['train_net.py', '--help']\n"
            "try:\n    runpy.run_path('tools/train_net.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('jit filters:', [f[1].pattern for f in warnings.filters if f[1] is not None and 'jit' in f[1].pattern])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: train_net.py" in out.stdout, out.stderr
    assert "torch.jit.script" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr
    assert "jit filters: []" in out.stdout
