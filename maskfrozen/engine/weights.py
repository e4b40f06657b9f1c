"""Strict ``MODEL.WEIGHTS``: a checkpoint that does not fit the model is an error, not a warning.

Detectron2 (fvcore) loads any checkpoint with ``strict=False`` and only logs the missing keys,
the unexpected keys and the shape mismatches, so the weights of another model or another size
evaluate (or start training) a random or half-random model with exit code 0.
:class:`CheckedCheckpointer` raises :class:`WeightsMismatchError` instead, naming the file, the
counts and example keys; ``MODEL.WEIGHTS_ALLOW_PARTIAL True`` (train_net:
``--allow-partial-weights``) is the opt-out for fine-tuning from a backbone-only checkpoint, e.g.
detectron2's converted ImageNet ``.pkl`` files, which are partial by nature.

Backbone-only pretrained checkpoints (``tools/pretrain_backbone.py``, written by
:func:`save_backbone_checkpoint`) mark themselves (``"backbone_only"``) and load without the
opt-out, the way detectron2 loads ImageNet weights: their keys are the ResNet's own (``stem.*``,
``res2.*`` ...) and land on the model's ResNet, ``backbone.`` (DETR family, QuerySegmentor) or
``backbone.bottom_up.`` (an FPN backbone: SOTR, detectron2's R-CNNs), where detectron2's name
matching would put them too. Strict there: every ResNet key must be in the file with its shape,
and the file holds nothing else; the rest of the model keeps its initialisation. Such a file
starts a training run: loading it into a model in eval mode (a Predictor) or for
``--eval-only`` is an error. A missing ``MODEL.WEIGHTS`` file is a ``FileNotFoundError``
naming the command that makes it when it is a pretrained backbone."""
import glob
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from detectron2.modeling.backbone.resnet import ResNet
from fvcore.common.checkpoint import _filter_reused_missing_keys, _IncompatibleKeys
from torch.nn.parallel import DistributedDataParallel

from .checkpointer import AtomicCheckpointer, atomic_write

logger = logging.getLogger(__name__)

OPT_OUT = "pass --allow-partial-weights to tools/train_net.py or set MODEL.WEIGHTS_ALLOW_PARTIAL True"
MAX_EXAMPLES = 3
BACKBONE_ONLY = "backbone_only"  # marker key of a backbone-only pretrained checkpoint (its metadata)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN_CONFIGS = os.path.join(REPO, "configs", "*", "pretrain", "*.yaml")


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
    converted: bool = False, backbone_only: bool = False,
) -> None:
    """Raise :class:`WeightsMismatchError` when ``incompatible`` (detectron2's ``_load_model``
    result for checkpoint ``path``) lists any problem; with ``allow_partial``, log one warning.

    ``converted``: the checkpoint was matched by name heuristics (detectron2 model-zoo / ImageNet
    ``.pkl``), which the message mentions. ``backbone_only``: ``incompatible`` compares a
    backbone-only checkpoint with the model's ResNet only (:func:`load_backbone_only`)."""
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
    if backbone_only:
        kind = (" It is a backbone-only pretrained checkpoint, compared with the model's ResNet only: a ResNet "
                "of another depth, width or norm (MODEL.RESNETS) than the one it was pretrained as.")
    raise WeightsMismatchError(
        f"checkpoint {path} does not fit the model {type(model).__name__}: {summary} (all listed in the log "
        f"above). The model would keep random weights there: is it the checkpoint of another config?{kind} "
        f"To load only what fits (fine-tuning from a backbone-only or other-class checkpoint), {OPT_OUT}."
    )


# ----------------------------------------------------------------------------- backbone-only checkpoints
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def resnet_of_backbone(backbone: Optional[torch.nn.Module]) -> Tuple[str, ResNet]:
    """``("", backbone)`` when ``backbone`` is a ResNet, ``("bottom_up.", backbone.bottom_up)`` when it
    is an FPN over one (detectron2's FPN backbones); :class:`WeightsMismatchError` otherwise."""
    if isinstance(backbone, ResNet):
        return "", backbone
    if isinstance(getattr(backbone, "bottom_up", None), ResNet):
        return "bottom_up.", backbone.bottom_up
    raise WeightsMismatchError(f"the backbone ({type(backbone).__name__}) is neither a ResNet nor an FPN over one")


def backbone_resnet(model: torch.nn.Module) -> Tuple[str, ResNet]:
    """The model's ResNet and the prefix of its keys in ``model.state_dict()``: ``"backbone."``
    when ``model.backbone`` is a ResNet, ``"backbone.bottom_up."`` when it is an FPN over one.

    Raises :class:`WeightsMismatchError` when it has neither (e.g. Mask Frozen-DETR: its
    detector, backbone included, comes from ``MODEL.MASK_FROZEN.DETECTOR_WEIGHTS``)."""
    model = _unwrap(model)
    try:
        prefix, resnet = resnet_of_backbone(getattr(model, "backbone", None))
    except WeightsMismatchError:
        raise WeightsMismatchError(
            f"{type(model).__name__} has no ResNet at model.backbone or model.backbone.bottom_up (model.backbone is "
            f"{type(getattr(model, 'backbone', None)).__name__}): a backbone-only checkpoint has nowhere to go"
        ) from None
    return "backbone." + prefix, resnet


def save_backbone_checkpoint(model: torch.nn.Module, path: str, meta: Dict[str, Any]) -> int:
    """Write the ResNet of ``model`` (:func:`backbone_resnet`) to ``path`` atomically as a
    backbone-only checkpoint; returns the number of tensors.

    detectron2's ImageNet format: the ResNet's own keys (``stem.conv1.weight``, ``res2.0.conv1.weight``
    ...) with ``matching_heuristics`` (plain detectron2 matches them by suffix onto ``backbone.*`` or
    ``backbone.bottom_up.*``), plus ``meta`` under ``"backbone_only"`` (the pretraining config, its
    input normalisation ``pixel_mean`` / ``pixel_std``, ...), the marker :class:`CheckedCheckpointer` reads."""
    _, resnet = backbone_resnet(model)
    state = {k: v.detach().cpu().clone() for k, v in resnet.state_dict().items()}
    data = {"model": state, "__author__": "maskfrozen tools/pretrain_backbone.py", "matching_heuristics": True,
            BACKBONE_ONLY: dict(meta)}
    atomic_write(path, lambda f: torch.save(data, f))
    return len(state)


def read_backbone_meta(path: str) -> Optional[Dict[str, Any]]:
    """The metadata of the backbone-only checkpoint ``path``; None for any other (or unreadable) file."""
    if not os.path.isfile(path) or path.endswith((".pkl", ".pyth")):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file: not a backbone-only checkpoint; the load reports it
        return None
    meta = data.get(BACKBONE_ONLY) if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else None


def _check_input_normalisation(model: torch.nn.Module, meta: Dict[str, Any], path: str) -> None:
    """The model normalises its input as the backbone was pretrained (``pixel_mean`` / ``pixel_std``)."""
    for name in ("pixel_mean", "pixel_std"):
        ours, theirs = getattr(_unwrap(model), name, None), meta.get(name)
        if not isinstance(ours, torch.Tensor) or theirs is None:
            continue
        if not torch.allclose(ours.detach().flatten().cpu().float(), torch.tensor(theirs, dtype=torch.float32)):
            raise WeightsMismatchError(
                f"backbone-only checkpoint {path} was pretrained on inputs normalised with MODEL.{name.upper()} "
                f"{list(theirs)}, the model uses {ours.flatten().tolist()}: its features would not fit; set "
                f"MODEL.{name.upper()} as the pretraining config {meta.get('config', '')} does")


def load_backbone_only(model: torch.nn.Module, checkpoint: Dict[str, Any], path: str,
                       allow_partial: bool = False) -> _IncompatibleKeys:
    """Load a backbone-only checkpoint (:func:`save_backbone_checkpoint`) into the model's ResNet.

    Every key of the ResNet must be in the file with the same shape and the file must hold no other
    (BatchNorm's ``num_batches_tracked`` counter is dropped where the model has a frozen BN without
    one); otherwise :class:`WeightsMismatchError` (``allow_partial``: one warning, what fits is
    loaded). Nothing outside the ResNet changes. Returns the problems found (none when strict)."""
    meta = checkpoint[BACKBONE_ONLY]
    prefix, resnet = backbone_resnet(model)
    own = resnet.state_dict()
    theirs = {k: v for k, v in checkpoint["model"].items() if k in own or not k.endswith("num_batches_tracked")}
    shapes = [(prefix + k, tuple(v.shape), tuple(own[k].shape)) for k, v in theirs.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    incompatible = _IncompatibleKeys(missing_keys=[prefix + k for k in own if k not in theirs],
                                     unexpected_keys=[prefix + k for k in theirs if k not in own],
                                     incorrect_shapes=shapes)
    if incompatible_keys_summary(incompatible, model):  # the full lists, before the summary
        logger.warning(f"{path} vs the ResNet of {type(_unwrap(model)).__name__}: missing {incompatible.missing_keys}; "
                       f"unexpected {incompatible.unexpected_keys}; shape mismatches {shapes}")
    check_incompatible_keys(incompatible, model, path, allow_partial, backbone_only=True)
    _check_input_normalisation(model, meta, path)
    mismatched = {k[len(prefix):] for k, _, _ in shapes}
    fits = {k: v for k, v in theirs.items() if k in own and k not in mismatched}
    resnet.load_state_dict(fits, strict=False)
    others = len(_unwrap(model).state_dict()) - len(own)
    logger.info(f"{path}: backbone-only checkpoint (pretrained by {meta.get('config', '?')}, "
                f"{meta.get('iterations', '?')} iterations, val accuracy {meta.get('val_accuracy', '?')}): "
                f"{len(fits)} tensors loaded into {type(_unwrap(model)).__name__}.{prefix}*; the other {others} "
                "keys of the model keep their initialisation")
    return incompatible if allow_partial else _IncompatibleKeys([], [], [])


def _pretrain_config_writing(path: str) -> Optional[str]:
    """The shipped pretraining config (``configs/*/pretrain/*.yaml``) whose ``BACKBONE_PRETRAIN.OUTPUT`` is ``path``."""
    for config in sorted(glob.glob(PRETRAIN_CONFIGS)):
        with open(config) as f:
            output = ((yaml.safe_load(f) or {}).get("BACKBONE_PRETRAIN") or {}).get("OUTPUT")
        if output and os.path.abspath(output) == os.path.abspath(path):
            return os.path.relpath(config, REPO)
    return None


def missing_weights_error(path: str) -> FileNotFoundError:
    """The error for a ``MODEL.WEIGHTS`` file that does not exist; names the command that writes it
    when it is a shipped pretraining config's output."""
    message = f"checkpoint {path} (MODEL.WEIGHTS) does not exist"
    config = _pretrain_config_writing(path)
    if config:
        message += (f": it is the backbone pretrained on the training split by `make pretrain` (python "
                    f"tools/pretrain_backbone.py --config-file {config}, run from the repository root); run that "
                    f"once, or train from random initialisation with MODEL.WEIGHTS \"\"")
    return FileNotFoundError(message)


class CheckedCheckpointer(AtomicCheckpointer):
    """:class:`AtomicCheckpointer` whose model loading goes through :func:`check_incompatible_keys`.

    Resuming the run's own checkpoints is unaffected (they fit the model exactly)."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, allow_partial: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.allow_partial = bool(allow_partial)
        self._loading: Optional[str] = None

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise missing_weights_error(path)
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        path = self._loading or "(unnamed)"
        if isinstance(checkpoint.get(BACKBONE_ONLY), dict):
            if not _unwrap(self.model).training and not self.allow_partial:
                raise WeightsMismatchError(
                    f"checkpoint {path} is a backbone-only pretrained checkpoint, the start of a training run: "
                    f"loaded into a model in eval mode (a Predictor) it would predict with untrained heads; pass "
                    f"MODEL.WEIGHTS of a trained model (e.g. OUTPUT_DIR/model_final.pth)")
            return load_backbone_only(self.model, checkpoint, path, self.allow_partial)
        converted = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        try:
            check_incompatible_keys(incompatible, self.model, path, self.allow_partial, converted)
        except WeightsMismatchError:
            self._log_incompatible_keys(incompatible)  # the full key lists, before the summary
            raise
        return incompatible


def require_eval_weights(cfg, checkpointer: CheckedCheckpointer, resume: bool) -> None:
    """For ``--eval-only``: raise ValueError when nothing would be loaded (empty MODEL.WEIGHTS and
    no checkpoint to resume) or only a pretrained backbone, unless MODEL.WEIGHTS_ALLOW_PARTIAL."""
    if (resume and checkpointer.has_checkpoint()) or checkpointer.allow_partial:
        return
    if cfg.MODEL.WEIGHTS and read_backbone_meta(cfg.MODEL.WEIGHTS) is not None:
        raise ValueError(
            f"--eval-only with MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}, a backbone-only pretrained checkpoint (the config's "
            f"training start), would evaluate untrained heads: pass MODEL.WEIGHTS path/to/model_final.pth")
    if cfg.MODEL.WEIGHTS:
        return
    raise ValueError(
        f"--eval-only with MODEL.WEIGHTS empty (and no checkpoint to resume in OUTPUT_DIR {cfg.OUTPUT_DIR}) "
        f"would evaluate a randomly initialised model: pass MODEL.WEIGHTS path/to/model_final.pth "
        f"(to evaluate a random model anyway, {OPT_OUT})"
    )
