"""tools/benchmark_mask_frozen.py: the end-to-end baseline goes through the detector
interface (gradients reach the detector), and a dead variant process is an error with
its exit code instead of a hang."""
import multiprocessing as mp
import os
import sys
import time

import pytest
from detectron2.modeling import build_model

from conftest import REPO, make_cfg

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark_mask_frozen as bench  # noqa: E402

TINY = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "dino_R18_tiny.yaml")


def test_dead_variant_process_is_an_error_with_its_exit_code():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    start = time.time()
    with pytest.raises(RuntimeError, match=r"'frozen' died without a result \(exit code 3\)"):
        bench.wait_for_result("frozen", proc, queue, poll_s=0.2)
    assert time.time() - start < 30


def test_end_to_end_losses_train_the_detector_through_its_interface(tmp_path, one_thread):
    from maskfrozen.engine import Trainer

    cfg = make_cfg(TINY, tmp_path)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    model = build_model(cfg)
    model.train()
    assert not model.detector.training and not any(p.requires_grad for p in model.detector.parameters())
    bench.unfreeze(model)
    losses = bench.end_to_end_losses(model, batch)
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(losses)
    assert any(k.endswith("_dn") for k in losses)  # the tiny DINO's denoising set
    sum(losses.values()).backward()
    backbone_grads = [p.grad for p in model.detector.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    model.eval()
    assert not model.detector.training
