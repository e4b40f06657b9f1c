"""maskfrozen: query-based instance segmentation models for Detectron2.

Importing this package registers every model, dataset mapper and dataset with
Detectron2's registries; ``add_maskfrozen_config(cfg)`` adds the config keys;
``Predictor(cfg)(bgr_image)`` predicts one image (detectron2's DefaultPredictor, input checked).
"""
__version__ = "0.1.0"


def _import_detectron2_quietly() -> None:
    """Import detectron2's modeling first, with one warning silenced during that import only:
    the FutureWarning that torch raises for each ``torch.jit.script`` call, which fvcore's focal
    loss and detectron2's box regression make at import time (third-party calls we cannot
    change). Every other warning, and that one from any later call, is left as it is."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import detectron2.modeling  # noqa: F401


_import_detectron2_quietly()

from .config import add_maskfrozen_config  # noqa: E402
from . import data  # noqa: E402,F401  (registers datasets and mappers)
from . import modeling  # noqa: E402,F401  (registers meta-architectures)
from . import evaluation  # noqa: E402,F401  (COCOEvaluator backend, evaluator registry)
from .engine.predictor import Predictor  # noqa: E402

__all__ = ["Predictor", "add_maskfrozen_config", "__version__"]
