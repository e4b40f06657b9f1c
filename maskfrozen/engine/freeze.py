"""Freezing parameters by name pattern (``MODEL.FREEZE_PATTERNS``).

A frozen parameter has ``requires_grad=False``, so the optimizer never sees it. A module
whose parameters are all frozen (and that has at least one) is also pinned to eval mode,
so its norm layers keep their statistics even when the model is put in train mode."""
import logging
import re
import types
from typing import List, Sequence

from torch import nn

logger = logging.getLogger(__name__)


def _train_stays_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``module.train`` of a frozen module: always eval mode."""
    return nn.Module.train(module, False)


def pin_eval_mode(module: nn.Module) -> None:
    """Keep ``module`` (and its children) in eval mode whatever ``train()`` is called with."""
    module.train = types.MethodType(_train_stays_eval, module)
    module.eval()


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
