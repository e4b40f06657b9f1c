"""Dataset mappers, chosen by name from ``INPUT.DATASET_MAPPER_NAME``, and the image reader
shared by the mappers and the demo (``read_image``).

``"default"`` is detectron2's ``DatasetMapper`` reading images with ``read_image``: a missing
or corrupt file raises ``ImageReadError`` naming the file (detectron2 itself raises a bare
PIL/OS error), and 16-bit images are scaled to 8 bit (detectron2's reader clips them at 255,
so a 16-bit PNG reads nearly white). Grayscale and palette images are converted to the
model's 3-channel format as detectron2's ``read_image`` does."""
import copy
import logging
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from detectron2.utils.registry import Registry
from PIL import Image

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = """Dataset mappers keyed by ``INPUT.DATASET_MAPPER_NAME``:
``factory(cfg, is_train) -> callable(dataset_dict) -> model input``."""


class ImageReadError(OSError):
    """An image file of a dataset is missing or cannot be decoded."""


def image_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL modes ``I;16*``) scaled to 8-bit ``L`` (``v / 257``,
    65535 -> 255); a 32-bit integer one (mode ``I``) likewise when a value exceeds 255.
    Other images are returned unchanged (PIL reads 16-bit colour PNGs as 8-bit already)."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float32) / 257.0
    elif image.mode == "I":
        values = np.asarray(image, dtype=np.float32)
        if values.max(initial=0.0) > 255:
            values = values / 257.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def read_image(file_name: str, format: Optional[str] = "BGR") -> np.ndarray:
    """An image file as detectron2's ``read_image`` returns it (EXIF orientation applied,
    HxWxC uint8 in ``format``), 16-bit images scaled to 8 bit first (``image_to_8bit``).

    Raises:
        ImageReadError: the file is missing or is not a decodable image (names the file)."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = utils._apply_exif_orientation(Image.open(f))
            return utils.convert_PIL_to_numpy(image_to_8bit(image), format)
    except OSError as e:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
        raise ImageReadError(f"cannot read image {file_name!r}: {e}") from e


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper with the images read by ``read_image`` (16-bit scaled to
    8 bit, errors naming the file); everything else as detectron2 does it."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = self._read_sem_seg(dataset_dict.pop("sem_seg_file_name"))
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    @staticmethod
    def _read_sem_seg(file_name: str) -> np.ndarray:
        """A label map as detectron2 reads it (mode ``L``, values are class ids: not rescaled)."""
        try:
            return utils.read_image(file_name, "L").squeeze(2)
        except OSError as e:
            raise ImageReadError(f"cannot read semantic segmentation {file_name!r}: {e}") from e


@MAPPER_REGISTRY.register()
def default(cfg: CfgNode, is_train: bool) -> Callable:
    """detectron2's standard mapper (resize, flip, instance annotations)."""
    return CheckedDatasetMapper(cfg, is_train)


def build_mapper(cfg: CfgNode, is_train: bool) -> Callable:
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a registered dataset mapper; "
            f"known: {sorted(k for k, _ in MAPPER_REGISTRY)}"
        )
    return MAPPER_REGISTRY.get(name)(cfg, is_train)
