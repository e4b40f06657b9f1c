"""Evaluator selection from dataset metadata (``MetadataCatalog.get(name).evaluator_type``)."""
import logging
import os
from typing import Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, LVISEvaluator
from detectron2.utils import comm
from detectron2.utils.registry import Registry

from ..data.datasets import ensure_dataset_files

logger = logging.getLogger(__name__)

EVALUATOR_REGISTRY = Registry("EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = """Evaluator factories keyed by a dataset's ``evaluator_type``:
``factory(cfg, dataset_name, output_dir) -> DatasetEvaluator``; the factory's
function name is the ``evaluator_type`` it serves."""


def dataset_class_count(dataset_name: str) -> Optional[int]:
    """The number of classes of a dataset from its metadata (the contiguous-id map, else
    ``thing_classes``); None when the metadata has neither."""
    meta = MetadataCatalog.get(dataset_name)
    mapping = meta.get("thing_dataset_id_to_contiguous_id")
    if mapping is not None:
        return len(mapping)
    classes = meta.get("thing_classes")
    return None if classes is None else len(classes)


class DatasetClassesCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` for a model that may have more class outputs than the
    dataset has classes (a class count set above the data's, which the start-up allows with a
    warning): predictions of classes the dataset lacks are dropped before evaluation (no ground
    truth can match them, and COCOEvaluator asserts on them after the whole run), and their
    number is logged once in ``evaluate``. Every other prediction is evaluated unchanged, so the
    numbers equal COCOeval's over the dataset's categories."""

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._num_dataset_classes = dataset_class_count(dataset_name)
        self._dropped = 0

    def reset(self) -> None:
        super().reset()
        self._dropped = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        if self._num_dataset_classes is not None:
            outputs = [self._known_classes_only(output) for output in outputs]
        super().process(inputs, outputs)

    def _known_classes_only(self, output: Dict) -> Dict:
        instances = output.get("instances")
        if instances is None or not instances.has("pred_classes"):
            return output
        keep = instances.pred_classes < self._num_dataset_classes
        if bool(keep.all()):
            return output
        self._dropped += int((~keep).sum())
        return {**output, "instances": instances[keep]}

    def evaluate(self, img_ids=None):
        dropped = sum(comm.all_gather(self._dropped)) if self._distributed else self._dropped
        if dropped:
            logger.warning(f"{self._metadata.name}: dropped {dropped} predictions of classes >= "
                           f"{self._num_dataset_classes}, which the dataset does not have (the model's class "
                           "count is larger than the dataset's)")
        return super().evaluate(img_ids)


@EVALUATOR_REGISTRY.register()
def coco(cfg: CfgNode, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """COCO evaluation (:class:`DatasetClassesCOCOEvaluator`) over the tasks the model predicts
    (bbox, plus segm with masks)."""
    tasks = ["bbox", "segm"] if cfg.MODEL.MASK_ON else ["bbox"]
    return DatasetClassesCOCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_dir)


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
