"""COCO evaluation backend for detectron2's ``COCOEvaluator``.

``COCOEvaluator(use_fast_impl=True)`` (its default) evaluates with ``COCOeval_opt``,
whose C++ half lives in ``detectron2._C``. When that is missing (the pure-Python
detectron2 build maskfrozen installs), ``select_coco_eval_backend`` puts in its place
``faster_coco_eval.COCOeval_faster`` (same numbers, C++ speed) when that package is
installed, else pycocotools' ``COCOeval``. An official detectron2 build keeps its own.
"""
import logging

from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)


def _faster_coco_eval_class():
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None

    class FasterCOCOeval(COCOeval_faster):
        """``COCOeval_faster`` that prints its summary like pycocotools does."""

        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", **kwargs):
            kwargs.setdefault("print_function", print)
            super().__init__(cocoGt, cocoDt, iouType, **kwargs)

    return FasterCOCOeval


def _detectron2_has_compiled_ops() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def select_coco_eval_backend() -> str:
    """Make ``COCOEvaluator``'s fast path usable; returns the backend's name."""
    from detectron2.evaluation import coco_evaluation

    if _detectron2_has_compiled_ops():
        return "detectron2"
    faster = _faster_coco_eval_class()
    coco_evaluation.COCOeval_opt = faster or COCOeval
    name = "faster-coco-eval" if faster else "pycocotools"
    logger.debug("COCOEvaluator's fast COCOeval: %s", name)
    return name


COCO_EVAL_BACKEND = select_coco_eval_backend()
