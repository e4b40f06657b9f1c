"""maskfrozen: query-based instance segmentation models for Detectron2.

Importing this package registers every model, dataset mapper and dataset with
Detectron2's registries; ``add_maskfrozen_config(cfg)`` adds the config keys;
``Predictor(cfg)(bgr_image)`` predicts one image (detectron2's DefaultPredictor, input checked).
"""
__version__ = "0.1.0"

from .config import add_maskfrozen_config  # noqa: E402
from . import data  # noqa: E402,F401  (registers datasets and mappers)
from . import modeling  # noqa: E402,F401  (registers meta-architectures)
from . import evaluation  # noqa: E402,F401  (COCOEvaluator backend, evaluator registry)
from .engine.predictor import Predictor  # noqa: E402

__all__ = ["Predictor", "add_maskfrozen_config", "__version__"]
