"""DDP on CPU: two gloo processes through maskfrozen's launch and Trainer keep identical
replicas after a step (gradients are all-reduced), and the step changed the weights."""
import os

import torch

from conftest import TINY_CONFIG, make_cfg
from maskfrozen.engine import launch


def _train_one_step(output_dir):
    from detectron2.utils import comm

    from maskfrozen.engine import Trainer

    torch.set_num_threads(1)
    cfg = make_cfg(TINY_CONFIG, output_dir, "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1000",
                   "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {k: v.clone() for k, v in trainer.model.module.state_dict().items()}
    trainer.train()
    rank = comm.get_rank()
    torch.save({"initial": initial, "final": trainer.model.module.state_dict(),
                "world": comm.get_world_size()}, os.path.join(output_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_hold_identical_weights(tmp_path):
    launch(_train_one_step, 2, dist_url="auto", args=(str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    weights = [k for k, v in r0["final"].items() if v.dtype.is_floating_point and "running" not in k]
    for key in weights:
        assert torch.equal(r0["initial"][key], r1["initial"][key]), key  # same init (broadcast)
        assert torch.equal(r0["final"][key], r1["final"][key]), key  # same update on both ranks
    assert any(not torch.equal(r0["initial"][k], r0["final"][k]) for k in weights)
