"""Object crops of a detection dataset, the classification data of the backbone pretraining
(``tools/pretrain_backbone.py``): one item per annotated object, a square crop around its box
labelled with its class.

Geometry (``BACKBONE_PRETRAIN``): a square of side ``CROP_CONTEXT x max(w, h)`` centred on the
box, resized to ``CROP_SIZE`` pixels (detectron2's ``ExtentTransform``, zeros outside the
image); in training the side is scaled by ``exp(U(-SCALE_JITTER, SCALE_JITTER))``, the centre
shifted by ``U(-SHIFT_JITTER, SHIFT_JITTER)`` x side on each axis, and the crop flipped
horizontally and vertically with p = 0.5 each (a shape's class does not change under flips).
"""
import copy
from typing import Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from .datasets import ensure_dataset_files
from .mappers import read_image

__all__ = ["object_dicts", "crop_extent", "ObjectCropMapper"]


def object_dicts(dataset_names: Sequence[str]) -> List[Dict]:
    """One dict per non-crowd annotation of the datasets: ``file_name``, ``bbox`` (XYWH_ABS),
    ``label`` (the contiguous class id detectron2's loader gives), the image ``height``/``width``."""
    objects = []
    for name in dataset_names:
        ensure_dataset_files(name)
        for record in DatasetCatalog.get(name):
            for ann in record.get("annotations", []):
                if ann.get("iscrowd", 0):
                    continue
                box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYWH_ABS)
                objects.append({"file_name": record["file_name"], "bbox": box, "label": int(ann["category_id"]),
                                "height": record["height"], "width": record["width"]})
    if not objects:
        raise ValueError(f"datasets {list(dataset_names)} hold no (non-crowd) annotated object to crop")
    return objects


def crop_extent(bbox: Sequence[float], context: float, scale: float = 1.0, shift=(0.0, 0.0)) -> List[float]:
    """``[x0, y0, x1, y1]`` of the square crop of side ``context * max(w, h) * scale`` centred on
    the box centre moved by ``shift`` (fractions of the side)."""
    x, y, w, h = bbox
    side = context * max(w, h, 1.0) * scale
    cx, cy = x + w / 2 + shift[0] * side, y + h / 2 + shift[1] * side
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


class ObjectCropMapper:
    """``object_dicts`` item -> ``{"image": CHW uint8 crop, "label": class}`` (see module doc)."""

    def __init__(self, cfg: CfgNode, is_train: bool):
        p = cfg.BACKBONE_PRETRAIN
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.size, self.context = int(p.CROP_SIZE), float(p.CROP_CONTEXT)
        self.scale_jitter, self.shift_jitter = float(p.SCALE_JITTER), float(p.SHIFT_JITTER)

    def __call__(self, item: Dict) -> Dict:
        item = copy.deepcopy(item)
        image = read_image(item["file_name"], format=self.image_format)
        scale, shift, flips = 1.0, (0.0, 0.0), []
        if self.is_train:
            scale = float(np.exp(np.random.uniform(-self.scale_jitter, self.scale_jitter)))
            shift = tuple(np.random.uniform(-self.shift_jitter, self.shift_jitter, size=2))
            flips = [T.HFlipTransform(self.size), T.VFlipTransform(self.size)]
            flips = [f for f in flips if np.random.rand() < 0.5]
        extent = crop_extent(item["bbox"], self.context, scale, shift)
        transform = T.TransformList([T.ExtentTransform(extent, (self.size, self.size), interp=Image.BILINEAR)] + flips)
        crop = transform.apply_image(image)
        item["image"] = torch.as_tensor(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        return item
