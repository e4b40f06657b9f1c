"""Strict ``MODEL.WEIGHTS``: a checkpoint that does not fit the model is an error, not a warning.

Detectron2 (fvcore) loads any checkpoint with ``strict=False`` and only logs the missing keys,
the unexpected keys and the shape mismatches, so the weights of another model or another size
evaluate (or start training) a random or half-random model with exit code 0.
:class:`CheckedCheckpointer` raises :class:`WeightsMismatchError` instead, naming the file, the
counts and example keys; ``MODEL.WEIGHTS_ALLOW_PARTIAL True`` (train_net:
``--allow-partial-weights``) is the opt-out for fine-tuning from a backbone-only checkpoint, e.g.
detectron2's converted ImageNet ``.pkl`` files, which are partial by nature."""
import logging
from typing import Any, Dict, List, Optional

import torch
from fvcore.common.checkpoint import _filter_reused_missing_keys, _IncompatibleKeys

from .checkpointer import AtomicCheckpointer

logger = logging.getLogger(__name__)

OPT_OUT = "pass --allow-partial-weights to tools/train_net.py or set MODEL.WEIGHTS_ALLOW_PARTIAL True"
MAX_EXAMPLES = 3


class WeightsMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


def _examples(keys: List[str]) -> str:
    """Up to ``MAX_EXAMPLES`` of the sorted ``keys``, preferring different top-level modules."""
    keys = sorted(keys)
    firsts = {}
    for key in keys:
        firsts.setdefault(key.split(".")[0], key)
    chosen = list(firsts.values())[:MAX_EXAMPLES]
    chosen += [k for k in keys if k not in chosen][: MAX_EXAMPLES - len(chosen)]
    return ", ".join(chosen)


def incompatible_keys_summary(incompatible: _IncompatibleKeys, model: torch.nn.Module) -> List[str]:
    """One phrase per kind of problem (missing, unexpected, shape mismatch): count and examples.

    A shape-mismatched key is reported only as such (fvcore also lists it as missing); a missing
    key whose tensor is shared with a loaded key (tied weights) is not missing."""
    shapes = list(incompatible.incorrect_shapes)
    mismatched = {key for key, _, _ in shapes}
    missing = [k for k in _filter_reused_missing_keys(model, incompatible.missing_keys) if k not in mismatched]
    unexpected = list(incompatible.unexpected_keys)
    phrases = []
    if missing:
        phrases.append(f"{len(missing)} missing keys (in the model, not in the checkpoint; e.g. {_examples(missing)})")
    if unexpected:
        phrases.append(f"{len(unexpected)} unexpected keys (in the checkpoint, not in the model; e.g. "
                       f"{_examples(unexpected)})")
    if shapes:
        examples = [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in sorted(shapes)[:MAX_EXAMPLES]]
        phrases.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(examples)})")
    return phrases


def check_incompatible_keys(
    incompatible: _IncompatibleKeys, model: torch.nn.Module, path: str, allow_partial: bool,
    converted: bool = False,
) -> None:
    """Raise :class:`WeightsMismatchError` when ``incompatible`` (detectron2's ``_load_model``
    result for checkpoint ``path``) lists any problem; with ``allow_partial``, log one warning.

    ``converted``: the checkpoint was matched by name heuristics (detectron2 model-zoo / ImageNet
    ``.pkl``), which the message mentions."""
    phrases = incompatible_keys_summary(incompatible, model)
    if not phrases:
        return
    summary = "; ".join(phrases)
    if allow_partial:
        logger.warning(f"MODEL.WEIGHTS_ALLOW_PARTIAL: {path} loaded partially into {type(model).__name__}: "
                       f"{summary}; these keep their initial values")
        return
    kind = (" It is a converted detectron2/ImageNet checkpoint (matched by name heuristics), usually a "
            "backbone only, which is partial by nature." if converted else "")
    raise WeightsMismatchError(
        f"checkpoint {path} does not fit the model {type(model).__name__}: {summary} (all listed in the log "
        f"above). The model would keep random weights there: is it the checkpoint of another config?{kind} "
        f"To load only what fits (fine-tuning from a backbone-only or other-class checkpoint), {OPT_OUT}."
    )


class CheckedCheckpointer(AtomicCheckpointer):
    """:class:`AtomicCheckpointer` whose model loading goes through :func:`check_incompatible_keys`.

    Resuming the run's own checkpoints is unaffected (they fit the model exactly)."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, allow_partial: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.allow_partial = bool(allow_partial)
        self._loading: Optional[str] = None

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        converted = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        try:
            check_incompatible_keys(incompatible, self.model, self._loading or "(unnamed)", self.allow_partial,
                                    converted)
        except WeightsMismatchError:
            self._log_incompatible_keys(incompatible)  # the full key lists, before the summary
            raise
        return incompatible


def require_eval_weights(cfg, checkpointer: CheckedCheckpointer, resume: bool) -> None:
    """For ``--eval-only``: raise ValueError when nothing would be loaded (empty MODEL.WEIGHTS and
    no checkpoint to resume), unless MODEL.WEIGHTS_ALLOW_PARTIAL."""
    if cfg.MODEL.WEIGHTS or (resume and checkpointer.has_checkpoint()) or checkpointer.allow_partial:
        return
    raise ValueError(
        f"--eval-only with MODEL.WEIGHTS empty (and no checkpoint to resume in OUTPUT_DIR {cfg.OUTPUT_DIR}) "
        f"would evaluate a randomly initialised model: pass MODEL.WEIGHTS path/to/model_final.pth "
        f"(to evaluate a random model anyway, {OPT_OUT})"
    )
