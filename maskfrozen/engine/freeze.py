"""Freezing parameters by name pattern (``MODEL.FREEZE_PATTERNS``).

A frozen parameter has ``requires_grad=False``, so the optimizer never sees it. A module
whose parameters are all frozen (and that has at least one) is also pinned to eval mode,
so its norm layers keep their statistics even when the model is put in train mode: its
class becomes a subclass whose ``train`` method always selects eval mode
(:class:`EvalModePinned`), a real override that :func:`unpin_eval_mode` undoes."""
import logging
import re
from typing import Dict, List, Sequence

from torch import nn

__all__ = ["EvalModePinned", "pin_eval_mode", "unpin_eval_mode", "freeze_by_patterns"]

logger = logging.getLogger(__name__)


class EvalModePinned:
    """Mixin put in front of a module's class: ``train(mode)`` always means eval mode."""

    def train(self, mode: bool = True):
        return super().train(False)


_PINNED_CLASSES: Dict[type, type] = {}


def _pinned_class(cls: type) -> type:
    """``EvalModePinned`` + ``cls``, one class per original class (same name prefixed)."""
    if cls not in _PINNED_CLASSES:
        _PINNED_CLASSES[cls] = type(f"EvalPinned{cls.__name__}", (EvalModePinned, cls), {"__module__": cls.__module__})
    return _PINNED_CLASSES[cls]


def pin_eval_mode(module: nn.Module) -> None:
    """Keep ``module`` (and its children) in eval mode whatever ``train()`` is called with."""
    if not isinstance(module, EvalModePinned):
        module.__class__ = _pinned_class(type(module))
    module.eval()


def unpin_eval_mode(module: nn.Module) -> None:
    """Undo :func:`pin_eval_mode`: ``train()`` works again (the mode is left as it is)."""
    if isinstance(module, EvalModePinned):
        module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, EvalModePinned))


def freeze_by_patterns(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Freeze every parameter whose name matches one of the regexes (``re.search``).

    Returns the frozen parameter names. An invalid regex or a pattern matching no
    parameter raises ``ValueError`` naming the pattern, so a typo cannot silently train
    what was meant to be frozen.
    """
    if not patterns:
        return []
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"MODEL.FREEZE_PATTERNS: invalid regex {pattern!r}: {e}") from e
    frozen, unused = [], set(patterns)
    for name, param in model.named_parameters():
        hits = [c.pattern for c in compiled if c.search(name)]
        if hits:
            param.requires_grad_(False)
            frozen.append(name)
            unused.difference_update(hits)
    if unused:
        raise ValueError(f"MODEL.FREEZE_PATTERNS: {sorted(unused)} match no parameter of the model")
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            pin_eval_mode(module)
    logger.info("Froze %d parameter tensors matching %s", len(frozen), list(patterns))
    return frozen
