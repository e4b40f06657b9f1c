"""Shared fixtures: tiny configs on the tiny shapes splits, a briefly trained model."""
import contextlib
import logging
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "shapes", "mask_rcnn_R18_FPN_tiny.yaml")


def make_cfg(config_file: str, output_dir: str, *opts):
    """A frozen config as tools/train_net.py builds it."""
    from maskfrozen.config import load_config

    return load_config(config_file, ["OUTPUT_DIR", str(output_dir), *opts])


class _ListHandler(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_logs(name: str = "maskfrozen", level: int = logging.INFO):
    """The messages logged at ``level`` or above to logger ``name`` or its children inside the
    block, as a list filled as they come (independent of propagation and of pytest's caplog)."""
    logger = logging.getLogger(name)
    handler = _ListHandler(level)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def overfit_loss_history(model, batch, steps: int, lr: float):
    """Total training loss of ``model`` at each of ``steps`` AdamW steps on one fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny models are dispatch-bound, so one thread is as fast
    alone and far faster on a loaded machine (two threads measured 8x slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """The tiny Mask R-CNN config trained for its 2 iterations: (cfg, weights path)."""
    from maskfrozen.engine import Trainer

    out = tmp_path_factory.mktemp("tiny_train")
    cfg = make_cfg(TINY_CONFIG, out)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = os.path.join(out, "model_final.pth")
    assert os.path.isfile(weights)
    return cfg, weights
