"""Training engine: Trainer, optimizer parameter groups, freezing, CPU-capable launch, and
the input-checking ``Predictor``."""
from .checkpointer import AtomicCheckpointer
from .freeze import freeze_by_patterns, pin_eval_mode
from .launch import launch
from .optimizer import build_optimizer, build_param_groups
from .predictor import Predictor
from .trainer import Trainer

__all__ = [
    "AtomicCheckpointer", "Predictor", "Trainer", "build_optimizer", "build_param_groups",
    "freeze_by_patterns", "launch", "pin_eval_mode",
]
