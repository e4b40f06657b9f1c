"""Optimizer construction from config: parameter groups and full-model gradient clipping.

Rules (applied per parameter, in this order):
- frozen parameters (``requires_grad=False``) are left out;
- lr x ``SOLVER.BACKBONE_MULTIPLIER`` for parameters under a module named ``backbone``;
- lr x m for each ``[substring, m]`` of ``SOLVER.LR_MULTIPLIERS`` found in the name;
- weight decay ``SOLVER.WEIGHT_DECAY_NORM`` for norm layers, ``SOLVER.WEIGHT_DECAY_EMBED``
  for ``nn.Embedding`` modules (the official Mask2Former / FastInst rule; with
  ``SOLVER.WEIGHT_DECAY_EMBED_BY_NAME`` also for bare parameters named like ``*embed*``, e.g.
  ``level_embed``, that are not inside a Linear/Conv), ``SOLVER.WEIGHT_DECAY_BIAS`` for biases.
  The official DETR-family recipes decay every parameter alike: their yaml files set
  ``WEIGHT_DECAY_NORM`` and ``WEIGHT_DECAY_EMBED`` to ``WEIGHT_DECAY``.
Parameters sharing (lr, weight decay) are merged into one group."""
from typing import Any, Dict, List, Tuple, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    # detectron2's FrozenBatchNorm2d has no parameters; its own "BN"/"GN"/"SyncBN" are torch's
    return isinstance(module, NORM_TYPES)


def _is_embedding(module: nn.Module, param_name: str, by_name: bool) -> bool:
    if isinstance(module, nn.Embedding):
        return True
    if not by_name or isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return False
    return "embed" in param_name


def param_hyperparams(
    full_name: str, module: nn.Module, param_name: str, cfg: CfgNode
) -> Tuple[float, float]:
    """(lr, weight_decay) of one parameter according to the rules in the module docstring."""
    solver = cfg.SOLVER
    lr, wd = solver.BASE_LR, solver.WEIGHT_DECAY
    if "backbone" in full_name.split("."):
        lr *= solver.BACKBONE_MULTIPLIER
    for substring, multiplier in solver.LR_MULTIPLIERS:
        if substring in full_name:
            lr *= float(multiplier)
    if _is_norm(module):
        wd = solver.WEIGHT_DECAY_NORM
    elif _is_embedding(module, param_name, solver.WEIGHT_DECAY_EMBED_BY_NAME):
        wd = solver.WEIGHT_DECAY_EMBED
    elif param_name == "bias" and solver.WEIGHT_DECAY_BIAS is not None:
        wd = solver.WEIGHT_DECAY_BIAS
    return lr, wd


def build_param_groups(model: nn.Module, cfg: CfgNode) -> List[Dict[str, Any]]:
    """Trainable parameters grouped by their (lr, weight_decay), each counted once."""
    groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            key = param_hyperparams(full_name, module, param_name, cfg)
            groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameter (check MODEL.FREEZE_PATTERNS)")
    return [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]


def with_full_model_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float):
    """A subclass of ``optimizer_cls`` that clips the global gradient norm over all its
    parameters before each step (Mask2Former's / DETR's "full_model" clipping)."""

    class FullModelClippingOptimizer(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelClippingOptimizer.__name__ = f"FullModelClipping{optimizer_cls.__name__}"
    return FullModelClippingOptimizer


def _optimizer_class_and_kwargs(solver: CfgNode):
    name = solver.OPTIMIZER.upper()
    if name == "SGD":
        return torch.optim.SGD, {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    if name == "ADAMW":
        return torch.optim.AdamW, {}
    raise ValueError(f"SOLVER.OPTIMIZER={solver.OPTIMIZER!r}: expected 'SGD' or 'ADAMW'")


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``SOLVER.OPTIMIZER`` over ``build_param_groups``, with
    gradient clipping as configured (``CLIP_TYPE: full_model`` or detectron2's types)."""
    optimizer_cls, kwargs = _optimizer_class_and_kwargs(cfg.SOLVER)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
    else:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(build_param_groups(model, cfg), lr=cfg.SOLVER.BASE_LR, **kwargs)

