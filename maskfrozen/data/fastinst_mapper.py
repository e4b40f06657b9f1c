"""FastInst's COCO training mapper, ``INPUT.DATASET_MAPPER_NAME: "fastinst_instance"``.

Training: with probability 0.5 (when ``INPUT.CROP.ENABLED``) a crop branch first:
``ResizeShortestEdge(INPUT.CROP.RESIZE.MIN_SIZE)`` (when ``CROP.RESIZE.ENABLED``) then
``RandomCrop(CROP.TYPE, CROP.SIZE)``; then always ``ResizeShortestEdge(MIN_SIZE_TRAIN,
MAX_SIZE_TRAIN)`` and the flip. GT masks as bitmasks, instances whose mask is empty after the
crop dropped (the LSJ mapper's instance handling; the official mapper keeps them). Testing:
detectron2's default mapper.
"""
from typing import Callable, List

from detectron2.config import CfgNode
from detectron2.data import transforms as T

from .lsj_mapper import LSJInstanceMapper
from .mappers import MAPPER_REGISTRY, CheckedDatasetMapper

__all__ = ["fastinst_augmentations"]


def fastinst_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """The training augmentations of the FastInst recipe (module doc)."""
    i = cfg.INPUT
    augs: List[T.Augmentation] = []
    if i.CROP.ENABLED:
        crop: List[T.Augmentation] = []
        if i.CROP.RESIZE.ENABLED:
            crop.append(T.ResizeShortestEdge(i.CROP.RESIZE.MIN_SIZE, sample_style=i.CROP.RESIZE.MIN_SIZE_TRAIN_SAMPLING))
        crop.append(T.RandomCrop(i.CROP.TYPE, i.CROP.SIZE))
        augs.append(T.RandomApply(T.AugmentationList(crop), prob=0.5))
    augs.append(T.ResizeShortestEdge(i.MIN_SIZE_TRAIN, i.MAX_SIZE_TRAIN, i.MIN_SIZE_TRAIN_SAMPLING))
    if i.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=i.RANDOM_FLIP == "horizontal", vertical=i.RANDOM_FLIP == "vertical"))
    return augs


@MAPPER_REGISTRY.register()
def fastinst_instance(cfg: CfgNode, is_train: bool) -> Callable:
    """FastInst's augmentations in training; detectron2's default mapper for testing."""
    if not is_train:
        return CheckedDatasetMapper(cfg, is_train)
    return LSJInstanceMapper(fastinst_augmentations(cfg), cfg.INPUT.FORMAT, "fastinst_instance")
