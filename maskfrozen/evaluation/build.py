"""Evaluator selection from dataset metadata (``MetadataCatalog.get(name).evaluator_type``)."""
import os

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.utils.registry import Registry

from ..data.datasets import ensure_dataset_files

EVALUATOR_REGISTRY = Registry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """Evaluator factories keyed by a dataset's ``evaluator_type``:
``factory(cfg, dataset_name, output_dir) -> DatasetEvaluator``; the factory's
function name is the ``evaluator_type`` it serves."""


@EVALUATOR_REGISTRY.register()
def coco(cfg: CfgNode, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """COCOEvaluator over the tasks the model predicts (bbox, plus segm with masks)."""
    tasks = ["bbox", "segm"] if cfg.MODEL.MASK_ON else ["bbox"]
    return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_dir)


@EVALUATOR_REGISTRY.register()
def lvis(cfg: CfgNode, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """LVISEvaluator (needs the lvis package)."""
    return LVISEvaluator(dataset_name, cfg, True, output_dir)


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str = None) -> DatasetEvaluator:
    """The evaluator registered for the dataset's ``evaluator_type``."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    ensure_dataset_files(dataset_name)  # COCOEvaluator reads the dataset's json at construction
    evaluator_type = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
    if evaluator_type is None:
        raise KeyError(
            f"dataset {dataset_name!r} has no evaluator_type in its metadata; set "
            "MetadataCatalog.get(name).evaluator_type (e.g. 'coco') when registering it"
        )
    if evaluator_type not in EVALUATOR_REGISTRY:
        raise KeyError(
            f"no evaluator registered for evaluator_type {evaluator_type!r} of dataset "
            f"{dataset_name!r}; known: {sorted(k for k, _ in EVALUATOR_REGISTRY)}"
        )
    return EVALUATOR_REGISTRY.get(evaluator_type)(cfg, dataset_name, output_folder)
