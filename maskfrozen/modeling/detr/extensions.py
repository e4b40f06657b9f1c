"""Training extensions of the DETR meta-architecture: modules that another package attaches
to :class:`~maskfrozen.modeling.detr.DeformableDETRFamily` without the detector knowing
them (the dependency points from the extension to the detector, never back).

An extension registers a builder under a name with :func:`register_detr_extension`. When the
detector is built, :func:`build_detr_extensions` calls every registered builder with the
config and the encoder's level strides; a builder returns a module, or None when its
config leaves it off. The detector holds each module as an attribute (and state_dict
prefix) of that name, and in training its ``losses`` calls it as
``module(detector, detected, targets) -> (extra losses, extra QuerySets)``: the losses are
added to the detector's, the query sets go through the detector's criterion. In inference
an extension only runs if it has ``postprocess_detections(scores, boxes, image_size,
output_size, max_detections)``: its Instances (or None: the detector's own post-processing)
replace the detector's top-k of each image (Co-DETR's official mmdet post-processing).
"""
from typing import Callable, Dict, Optional, Sequence

from torch import nn

__all__ = ["DETR_EXTENSIONS", "register_detr_extension", "build_detr_extensions"]

ExtensionBuilder = Callable[..., Optional[nn.Module]]  # (cfg, level_strides) -> module or None

DETR_EXTENSIONS: Dict[str, ExtensionBuilder] = {}


def register_detr_extension(name: str, builder: Optional[ExtensionBuilder] = None):
    """Register ``builder(cfg, level_strides) -> Optional[nn.Module]`` under ``name`` (the
    detector attribute that will hold the module); without ``builder``, a decorator.
    Registering a name twice with another builder is an error (re-registering the same
    builder, e.g. on a module reload, is not)."""
    if builder is None:
        return lambda fn: register_detr_extension(name, fn)
    if not name.isidentifier():
        raise ValueError(f"DETR extension name {name!r} must be a Python identifier (it becomes a module attribute)")
    known = DETR_EXTENSIONS.get(name)
    if known is not None and getattr(known, "__qualname__", None) != getattr(builder, "__qualname__", None):
        raise KeyError(f"DETR extension {name!r} is already registered (by {known.__module__}.{known.__qualname__})")
    DETR_EXTENSIONS[name] = builder
    return builder


def build_detr_extensions(cfg, level_strides: Sequence[int]) -> Dict[str, Optional[nn.Module]]:
    """Every registered extension's module for ``cfg`` (None where its config leaves it off),
    in registration order."""
    return {name: builder(cfg, list(level_strides)) for name, builder in DETR_EXTENSIONS.items()}
