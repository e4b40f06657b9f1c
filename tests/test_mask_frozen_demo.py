"""The Mask Frozen-DETR demo pipeline behind `make demo` (tools/run_demo.py) on the tiny shapes splits: train a tiny
detector, reuse it, train the mask network on it frozen, evaluate and draw overlays."""
import importlib.util
import os

from conftest import REPO


def load_run_demo():
    spec = importlib.util.spec_from_file_location("maskfrozen_run_demo", os.path.join(REPO, "tools", "run_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_pipeline_on_tiny_dataset(tmp_path, capsys):
    run_demo = load_run_demo()
    det_dir, mask_dir, overlays = tmp_path / "detector", tmp_path / "mask", tmp_path / "overlays"
    argv = [
        "--config-file", os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "dino_R18_tiny.yaml"),
        "--detector-config", os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml"),
        "--detector-opts", "OUTPUT_DIR", str(det_dir), "DATASETS.TEST", "()",
        "--output", str(overlays), "--num-images", "2",
        "OUTPUT_DIR", str(mask_dir), "SOLVER.MAX_ITER", "2",
    ]
    results = run_demo.main(argv)
    assert os.path.isfile(det_dir / "model_final.pth") and os.path.isfile(mask_dir / "model_final.pth")
    assert set(results) >= {"bbox", "segm"}
    assert sorted(os.listdir(overlays)) == ["000000.png", "000001.png"]
    out = capsys.readouterr().out
    assert "segm AP on shapes_tiny_val:" in out and "bbox AP on shapes_tiny_val:" in out
    # a second run reuses both trained stages
    det_mtime = os.path.getmtime(det_dir / "model_final.pth")
    run_demo.main(argv)
    assert os.path.getmtime(det_dir / "model_final.pth") == det_mtime
    assert "stage 1/2: reusing the trained detector" in capsys.readouterr().out
