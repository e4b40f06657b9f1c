"""tools/benchmark.py: model-agnostic (synthetic COCO-instance batches any model trains on),
two configs side by side with ratios, per-config overrides, the machine named."""
import os
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark  # noqa: E402

M2F_TINY = os.path.join(REPO, "configs", "shapes", "mask2former", "maskformer2_R18_tiny.yaml")
MF_TINY = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "dino_R18_tiny.yaml")


def test_synthetic_batch_is_a_valid_instance_batch():
    batch = benchmark.synthetic_batch(64, 3, 4, 5)
    assert len(batch) == 3
    for x in batch:
        inst = x["instances"]
        assert x["image"].shape == (3, 64, 64) and x["image"].dtype == torch.uint8
        assert len(inst) == 4 and inst.gt_masks.tensor.flatten(1).any(1).all()
        assert torch.equal(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
        assert int(inst.gt_classes.max()) < 5
    assert torch.equal(batch[0]["image"], benchmark.synthetic_batch(64, 3, 4, 5)[0]["image"])  # fixed seed


def test_overrides_and_table():
    assert benchmark.split_overrides(["a.yaml", "A.B=1", "C="]) == ["A.B", "1", "C", ""]
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        benchmark.split_overrides(["a.yaml", "A.B"])
    row = {"model": "M", "train_iter_s": 0.5, "infer_image_s": 0.1, "peak_memory_mb": 100.0, "params": 10,
           "trainable_params": 10}
    table = benchmark.format_table([row, {**row, "train_iter_s": 1.0, "model": "N"}])
    assert "[2] / [1]" in table and "2.00x" in table and "1.00x" in table
    assert "[2] / [1]" not in benchmark.format_table([row])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--config-file", "a", "--config-file", "b", "--config-file", "c"])


def test_two_configs_side_by_side(tmp_path, capsys):
    """Mask2Former vs Mask Frozen-DETR (random detector, its own overrides) in one run."""
    results = benchmark.main([
        "--config-file", M2F_TINY, "--config-file", MF_TINY, "MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR=True",
        "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS=", "--iters", "1", "--warmup", "0", "--threads", "1", "--size", "96",
        "--json", str(tmp_path / "out.json")])
    assert [r["model"] for r in results] == ["QuerySegmentor", "MaskFrozenDETR"]
    assert all(r["train_iter_s"] > 0 and r["infer_image_s"] > 0 and r["size"] == 96 for r in results)
    assert results[1]["trainable_params"] < results[1]["params"]  # the detector is frozen
    out = capsys.readouterr().out
    assert "machine:" in out and "cores" in out and "[2] / [1]" in out
    assert (tmp_path / "out.json").is_file()


def test_breakdown_times_every_top_level_module_and_adds_up(capsys):
    """--breakdown: one entry per top-level module of the model plus the rest of the forward,
    backward and the step; the parts are non-negative and sum to about one iteration."""
    results = benchmark.main(["--config-file", M2F_TINY, "--iters", "2", "--warmup", "1", "--threads", "1",
                              "--size", "96", "--breakdown"])
    parts = results[0]["train_breakdown_s"]
    stages = {"forward: backbone", "forward: pixel_decoder", "forward: transformer_decoder", "forward: criterion"}
    assert stages | {"forward: rest (meta-arch)", "backward", "optimizer step"} == set(parts)
    assert all(v >= 0 for v in parts.values())
    assert 0.5 * results[0]["train_iter_s"] < sum(parts.values()) < 2.0 * results[0]["train_iter_s"]
    assert "where a training iteration goes" in capsys.readouterr().out
