"""``Trainer``: detectron2's DefaultTrainer with maskfrozen's configurable pieces.

Differences from DefaultTrainer, each driven by config:
- the train/test loaders use the dataset mapper named by ``INPUT.DATASET_MAPPER_NAME``;
- the evaluator comes from the dataset's ``evaluator_type`` (``EVALUATOR_REGISTRY``);
- the optimizer uses parameter groups and full-model clipping (``engine.optimizer``);
- parameters matching ``MODEL.FREEZE_PATTERNS`` are frozen;
- AMP is used only where CUDA exists (``SOLVER.AMP.ENABLED`` is ignored on CPU, with a
  warning), and DDP also runs on CPU processes (gloo);
- checkpoints are written atomically (``AtomicCheckpointer``), and ``MODEL.WEIGHTS`` must fit
  the model unless ``MODEL.WEIGHTS_ALLOW_PARTIAL`` (``weights.CheckedCheckpointer``);
- ``DATASETS.COCO_JSON`` datasets are registered, the model's class count is filled from /
  checked against the training data and the config's cross-key checks run before the model is
  built (``prepare_config``); every dataset json of the run (the test sets too) is validated
  before training starts (``check_datasets_before_training``).

``check_output_dir`` is the rule of tools/train_net.py against overwriting a run: a training
without ``--resume`` into an ``OUTPUT_DIR`` that holds a run's ``last_checkpoint`` is an error.
"""
import logging
import os
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..config import prepare_config
from ..data.datasets import check_datasets_before_training, ensure_dataset_files
from ..data.mappers import build_mapper
from ..evaluation.build import build_evaluator
from .freeze import freeze_by_patterns
from .optimizer import build_optimizer
from .weights import CheckedCheckpointer

logger = logging.getLogger(__name__)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel when several processes run (device_ids only for CUDA models)."""
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    device_ids = [comm.get_local_rank()] if on_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


LAST_CHECKPOINT = "last_checkpoint"  # the tag file detectron2's checkpointer writes in OUTPUT_DIR


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new training run over an existing one (its checkpoints and metrics).

    Without ``resume`` or ``overwrite``, an ``output_dir`` holding a run's ``last_checkpoint``
    tag raises FileExistsError naming the folder, the checkpoint and the three ways on:
    ``--resume``, another ``OUTPUT_DIR``, ``--overwrite``. Writes nothing."""
    tag = os.path.join(output_dir, LAST_CHECKPOINT)
    if resume or overwrite or not os.path.isfile(tag):
        return
    with open(tag) as f:
        last = f.read().strip()
    raise FileExistsError(
        f"OUTPUT_DIR {output_dir} already holds a training run (its {LAST_CHECKPOINT} names {last!r}): a new "
        f"training would overwrite its checkpoints and metrics. Pass --resume to continue that run, choose "
        f"another OUTPUT_DIR (e.g. OUTPUT_DIR {output_dir.rstrip('/')}_2), or pass --overwrite to start a new "
        f"run in it")


def forget_previous_run(output_dir: str) -> None:
    """``--overwrite``, once the new run is built: remove the previous run's ``last_checkpoint``
    tag (main process), so that a later ``--resume`` continues the new run, never the old one;
    the old checkpoints are replaced as the new run saves its own."""
    tag = os.path.join(output_dir, LAST_CHECKPOINT)
    if comm.is_main_process() and os.path.isfile(tag):
        os.remove(tag)
        logger.warning(f"--overwrite: a new run starts in {output_dir}; the previous run's {LAST_CHECKPOINT} tag "
                       "was removed and its checkpoints are replaced as this run saves its own")


def amp_enabled(cfg: CfgNode) -> bool:
    """``SOLVER.AMP.ENABLED`` where the model runs on CUDA; False (with a warning) elsewhere."""
    if not cfg.SOLVER.AMP.ENABLED:
        return False
    if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available():
        return True
    logger.warning("SOLVER.AMP.ENABLED is ignored: the model runs on %s, AMP needs CUDA", cfg.MODEL.DEVICE)
    return False


class Trainer(DefaultTrainer):
    """DefaultTrainer whose parts are chosen by config (see module docstring)."""

    def __init__(self, cfg: CfgNode):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = prepare_config(cfg)
        check_datasets_before_training(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model)
        loop = AMPTrainer if amp_enabled(cfg) else SimpleTrainer
        self._trainer = loop(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = CheckedCheckpointer(
            model, cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """The model of ``cfg`` after :func:`prepare_config` (class count from the data, config checks)."""
        model = super().build_model(prepare_config(cfg))
        freeze_by_patterns(model, cfg.MODEL.FREEZE_PATTERNS)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        for name in cfg.DATASETS.TRAIN:
            ensure_dataset_files(name)
        return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        ensure_dataset_files(dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str = None):
        return build_evaluator(cfg, dataset_name, output_folder)
