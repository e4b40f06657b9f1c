"""``Predictor``: detectron2's ``DefaultPredictor`` that checks and normalises its input.

``DefaultPredictor`` expects an ``HxWx3`` uint8 BGR array and trusts it: a float image in
[0, 1] gives garbage predictions without a word, and a grayscale, RGBA, empty array or a
file path crashes deep inside the model. ``Predictor`` converts what has one meaning
(grayscale ``HxW`` / ``HxWx1`` and ``HxWx4`` with alpha) to ``HxWx3`` and refuses the rest
with an error that says what was given and what is expected. Its weights load strictly
(:class:`~maskfrozen.engine.weights.CheckedCheckpointer`: a checkpoint of another model or
size is an error unless ``MODEL.WEIGHTS_ALLOW_PARTIAL``), and the config's own datasets
(``DATASETS.COCO_JSON``) and class counts are resolved and the config checked as training
did it (``maskfrozen.config.prepare_config``)."""
import logging
import os
from typing import Any, Dict

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..config import prepare_config
from .weights import CheckedCheckpointer

__all__ = ["Predictor", "as_bgr_uint8"]

logger = logging.getLogger(__name__)

EXPECTED = "an HxWx3 uint8 BGR numpy array (as cv2.imread returns)"


def _check_type_and_dtype(image: Any) -> None:
    """TypeError unless ``image`` is a numpy array of dtype uint8."""
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(
            f"Predictor expects {EXPECTED}, got a file path {image!r}: read it first, e.g. "
            f"detectron2.data.detection_utils.read_image(path, format='BGR')")
    if image is None:
        raise TypeError(f"Predictor expects {EXPECTED}, got None (cv2.imread returns None for a file it cannot read)")
    if not isinstance(image, np.ndarray):
        hint = " (a torch.Tensor: convert with .cpu().numpy())" if type(image).__module__.startswith("torch") else ""
        raise TypeError(f"Predictor expects {EXPECTED}, got {type(image).__module__}.{type(image).__name__}{hint}")
    if np.issubdtype(image.dtype, np.floating):
        raise TypeError(
            f"Predictor expects {EXPECTED}, got a {image.dtype} array (values {_value_range(image)}): "
            f"for an image in [0, 1] pass (image * 255).round().astype(np.uint8)")
    if image.dtype != np.uint8:
        raise TypeError(
            f"Predictor expects {EXPECTED}, got dtype {image.dtype} (values {_value_range(image)}): "
            f"convert it to 8 bit (a 16-bit image: (image / 257).round().astype(np.uint8))")


def _value_range(image: np.ndarray) -> str:
    """``min..max`` of ``image`` for an error message."""
    if image.size == 0:
        return "none"
    return f"{image.min()}..{image.max()}"


def as_bgr_uint8(image: Any) -> np.ndarray:
    """``image`` as an ``HxWx3`` uint8 array: ``HxW`` and ``HxWx1`` grayscale are repeated
    to 3 channels, the 4th (alpha) channel of ``HxWx4`` is dropped; ``HxWx3`` is returned as is.

    Raises:
        TypeError: not a numpy array (a path, a tensor), or not uint8 (float, 16-bit, ...).
        ValueError: an empty image, or a shape that is not HxW, HxWx1, HxWx3 or HxWx4.
    """
    _check_type_and_dtype(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"Predictor expects {EXPECTED}, got shape {image.shape} "
                         f"(accepted: HxWx3, grayscale HxW or HxWx1, HxWx4 with alpha)")
    if image.size == 0:
        raise ValueError(f"Predictor expects {EXPECTED}, got an empty image of shape {image.shape}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    return image


class Predictor(DefaultPredictor):
    """``DefaultPredictor`` with its input checked and converted by ``as_bgr_uint8``.

    ``predictor(image)`` takes an ``HxWx3`` uint8 array in BGR order (the channel order of
    ``cv2.imread``; an ``HxWx4`` array is taken as BGRA), grayscale ``HxW`` / ``HxWx1``
    uint8 too, and returns ``{"instances": Instances}`` at the input's size."""

    def __init__(self, cfg: CfgNode) -> None:  # DefaultPredictor's, with the strict checkpointer
        self.cfg = prepare_config(cfg).clone()  # cfg can be modified by the model
        self.model = build_model(self.cfg)  # sees MODEL.WEIGHTS (Mask Frozen-DETR: whole checkpoint or not)
        self.model.eval()
        if len(self.cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(self.cfg.DATASETS.TEST[0])
        test_size = self.cfg.INPUT.MIN_SIZE_TEST
        self.aug = T.ResizeShortestEdge([test_size, test_size], self.cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for the predictor, got {self.input_format!r}")
        weights = self.cfg.MODEL.WEIGHTS
        if not weights:
            logger.warning("MODEL.WEIGHTS is empty: the predictor's model keeps its random initial weights")
            return
        CheckedCheckpointer(self.model, allow_partial=self.cfg.MODEL.WEIGHTS_ALLOW_PARTIAL).load(weights)

    def __call__(self, original_image: Any) -> Dict[str, Any]:
        return super().__call__(as_bgr_uint8(original_image))
