"""Evaluation: the COCO backend for detectron2's COCOEvaluator and evaluator selection."""
from .coco import COCO_EVAL_BACKEND, select_coco_eval_backend
from .build import EVALUATOR_REGISTRY, build_evaluator

__all__ = ["COCO_EVAL_BACKEND", "select_coco_eval_backend", "EVALUATOR_REGISTRY", "build_evaluator"]
