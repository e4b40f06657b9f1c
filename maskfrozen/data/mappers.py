"""Dataset mappers, chosen by name from ``INPUT.DATASET_MAPPER_NAME``.

``"default"`` is detectron2's ``DatasetMapper`` with clear errors for unreadable images:
a missing or corrupt file raises ``ImageReadError`` naming the file (detectron2 itself
raises a bare PIL/OS error). Grayscale and palette images are converted to the model's
3-channel format by detectron2's ``read_image`` (documented detectron2 behaviour)."""
import logging
from typing import Any, Callable, Dict

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.utils.registry import Registry

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = """Dataset mappers keyed by ``INPUT.DATASET_MAPPER_NAME``:
``factory(cfg, is_train) -> callable(dataset_dict) -> model input``."""


class ImageReadError(OSError):
    """An image file of a dataset is missing or cannot be decoded."""


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper; reading errors name the offending file."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return super().__call__(dataset_dict)
        except OSError as e:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
            file_name = dataset_dict.get("file_name", "<no file_name>")
            raise ImageReadError(f"cannot read image {file_name!r}: {e}") from e


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
