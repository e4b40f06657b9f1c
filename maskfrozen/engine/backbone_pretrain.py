"""Pretraining the detectors' backbone (``tools/pretrain_backbone.py``, ``make pretrain``) with
detectron2's training loop: the ``BackbonePretrainer`` model (crop classification,
:mod:`maskfrozen.modeling.backbone_pretrain`) on the object crops of ``DATASETS.TRAIN``
(:mod:`maskfrozen.data.crops`), its accuracy on the crops of ``DATASETS.TEST``, and the export of
the ResNet as a backbone-only checkpoint (:func:`maskfrozen.engine.weights.save_backbone_checkpoint`)
that the detection configs name in ``MODEL.WEIGHTS``."""
import logging
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..config import add_maskfrozen_config
from ..data.crops import ObjectCropMapper, object_dicts
from ..modeling.backbone_pretrain import BackbonePretrainer, add_backbone_pretrain_config  # noqa: F401 (registers)
from .trainer import Trainer
from .weights import read_backbone_meta, save_backbone_checkpoint

__all__ = ["load_pretrain_config", "ObjectAccuracyEvaluator", "PretrainTrainer", "pretrain_backbone"]

logger = logging.getLogger(__name__)


def load_pretrain_config(config_file: str, opts: Sequence[str] = (), freeze: bool = True) -> CfgNode:
    """detectron2's + maskfrozen's defaults + ``BACKBONE_PRETRAIN`` + the file + overrides."""
    cfg = get_cfg()
    add_maskfrozen_config(cfg)
    add_backbone_pretrain_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


class ObjectAccuracyEvaluator(DatasetEvaluator):
    """Top-1 accuracy (%) of ``BackbonePretrainer`` over every crop: per level (``accuracy_<level>``)
    and of the levels together (``accuracy``: summed log-probabilities), plus the crop count."""

    def reset(self) -> None:
        self._correct: Dict[str, int] = OrderedDict()
        self._count = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for output in outputs:
            logits = {f: v.detach().cpu() for f, v in output["logits"].items()}
            scores = {f"accuracy_{f}": v for f, v in logits.items()}
            if len(logits) > 1:
                scores["accuracy"] = sum(v.log_softmax(-1) for v in logits.values())
            else:
                scores["accuracy"] = next(iter(logits.values()))
            for name, score in scores.items():
                self._correct[name] = self._correct.get(name, 0) + int(int(score.argmax()) == output["label"])
            self._count += 1

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        parts = comm.gather((self._correct, self._count), dst=0)
        if not comm.is_main_process():
            return {}
        count = sum(n for _, n in parts)
        results = {name: 100.0 * sum(c.get(name, 0) for c, _ in parts) / max(count, 1) for name in parts[0][0]}
        results["crops"] = float(count)
        return {"classification": results}


class PretrainTrainer(Trainer):
    """maskfrozen's Trainer on object crops (``maskfrozen.data.crops``) with the accuracy as evaluation."""

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(
            dataset=object_dicts(cfg.DATASETS.TRAIN), mapper=ObjectCropMapper(cfg, is_train=True),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS,
            aspect_ratio_grouping=False)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(dataset=object_dicts([dataset_name]),
                                           mapper=ObjectCropMapper(cfg, is_train=False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        return ObjectAccuracyEvaluator()


def _meta(cfg: CfgNode, config_file: str, trainer: PretrainTrainer, seconds: float) -> Dict:
    """What the checkpoint records: the config, data, input normalisation, final val accuracy, time."""
    accuracy = trainer.storage.latest().get("classification/accuracy", (float("nan"), None))[0]
    return {"config": config_file, "config_dump": cfg.dump(), "dataset": list(cfg.DATASETS.TRAIN),
            "iterations": int(cfg.SOLVER.MAX_ITER), "val_dataset": list(cfg.DATASETS.TEST),
            "val_accuracy": round(float(accuracy), 2),
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN], "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "input_format": cfg.INPUT.FORMAT, "seed": int(cfg.SEED), "train_seconds": round(seconds, 1)}


def pretrain_backbone(cfg: CfgNode, config_file: str, force: bool = False, resume: bool = False) -> Dict:
    """Train ``cfg``'s backbone on its object-classification task and write the backbone-only
    checkpoint ``BACKBONE_PRETRAIN.OUTPUT``; returns its metadata (``val_accuracy`` in %).

    An existing output pretrained with the same config is reused unless ``force``."""
    output = cfg.BACKBONE_PRETRAIN.OUTPUT
    existing = read_backbone_meta(output)
    if existing is not None and existing.get("config_dump") == cfg.dump() and not force:
        logger.info(f"{output} exists, pretrained with this config (val accuracy {existing.get('val_accuracy')}%): "
                    "reused (--force retrains)")
        return existing
    start = time.time()
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()  # detectron2's EvalHook evaluates at the end (ObjectAccuracyEvaluator)
    meta = _meta(cfg, config_file, trainer, time.time() - start)
    if comm.is_main_process():
        count = save_backbone_checkpoint(trainer.model, output, meta)
        logger.info(f"wrote {output}: {count} backbone tensors, val accuracy {meta['val_accuracy']}% on "
                    f"{meta['val_dataset']}, {meta['train_seconds']:.0f} s of pretraining")
    comm.synchronize()
    return meta
