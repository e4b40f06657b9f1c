"""Large-scale jitter (LSJ) training mapper of Mask2Former's COCO instance recipe,
``INPUT.DATASET_MAPPER_NAME: "coco_instance_lsj"``.

Training: horizontal flip (``INPUT.RANDOM_FLIP``), ``ResizeScale(MIN_SCALE, MAX_SCALE)`` of a
``IMAGE_SIZE`` square, ``FixedSizeCrop(IMAGE_SIZE)`` (pads smaller images); GT masks as
bitmasks (polygons are rasterised before the transforms, so cropping needs no shapely),
boxes recomputed from the masks, and instances whose mask is empty after the crop dropped
(the official mapper keeps them when their cropped polygon degenerates: Mask2Former issue
#215). Testing: detectron2's default mapper (resize to ``MIN_SIZE_TEST``), as the
official recipe does.
"""
import copy
from typing import Any, Callable, Dict, List

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, PolygonMasks

from .mappers import MAPPER_REGISTRY, CheckedDatasetMapper, read_image

__all__ = ["LSJInstanceMapper", "lsj_augmentations", "drop_empty_masks"]


def lsj_augmentations(image_size: int, min_scale: float, max_scale: float, random_flip: str) -> List[T.Augmentation]:
    """Flip (if ``random_flip`` is "horizontal" / "vertical"), ResizeScale, FixedSizeCrop."""
    augs: List[T.Augmentation] = []
    if random_flip != "none":
        augs.append(T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical"))
    augs.append(T.ResizeScale(min_scale=min_scale, max_scale=max_scale, target_height=image_size,
                              target_width=image_size))
    augs.append(T.FixedSizeCrop(crop_size=(image_size, image_size)))
    return augs


def _as_rle(obj: Dict[str, Any], height: int, width: int) -> Dict[str, Any]:
    """The annotation with a polygon ``segmentation`` turned into one RLE (decoded to a
    bitmask and transformed as an image by detectron2's annotation transform)."""
    segm = obj.get("segmentation")
    if isinstance(segm, list):
        obj = {**obj, "segmentation": mask_util.merge(mask_util.frPyObjects(segm, height, width))}
    return obj


def drop_empty_masks(instances: Instances) -> Instances:
    """Bitmask GT (polygons rasterised), boxes from the masks, instances with an empty mask dropped."""
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, *instances.image_size)
    instances.gt_masks = masks
    keep = masks.tensor.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
    instances = instances[keep]
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    return instances


class LSJInstanceMapper:
    """Training mapper: the image and its instances through the given augmentations (LSJ, or
    FastInst's resize + crop), GT as bitmasks, instances with an empty mask dropped."""

    def __init__(self, augmentations: List[T.Augmentation], image_format: str, name: str = "coco_instance_lsj"):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format, self.name = image_format, name

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = [utils.transform_instance_annotations(_as_rle(obj, height, width), transforms, shape)
                 for obj in dataset_dict.pop("annotations", []) if obj.get("iscrowd", 0) == 0]
        instances = utils.annotations_to_instances(annos, shape, mask_format="bitmask")
        if not annos:  # every annotation crowd (or none): no instances, empty masks
            instances.gt_masks = BitMasks(torch.zeros(0, *shape, dtype=torch.bool))
        elif not instances.has("gt_masks"):
            raise KeyError(f"{self.name}: {dataset_dict['file_name']!r} has annotations without 'segmentation'")
        dataset_dict["instances"] = drop_empty_masks(instances)
        return dataset_dict


@MAPPER_REGISTRY.register()
def coco_instance_lsj(cfg: CfgNode, is_train: bool) -> Callable:
    """LSJ in training (``INPUT.IMAGE_SIZE``, ``MIN_SCALE``, ``MAX_SCALE``, ``RANDOM_FLIP``);
    detectron2's default mapper for testing."""
    if not is_train:
        return CheckedDatasetMapper(cfg, is_train)
    i = cfg.INPUT
    return LSJInstanceMapper(lsj_augmentations(i.IMAGE_SIZE, i.MIN_SCALE, i.MAX_SCALE, i.RANDOM_FLIP), i.FORMAT)
