"""Read the model tensors of a checkpoint file for conversion, with errors that give the
real cause: a missing or empty file, a file that is not a torch checkpoint at all, pickled
Python objects refused by ``weights_only`` loading (then, and only then, ``--allow-pickle``
is the remedy), or a checkpoint without tensors."""
import os
from typing import Any, Dict, Optional

import torch

__all__ = ["CheckpointFormatError", "header_problem", "load_error_cause", "load_model_tensors"]

# torch.save writes a zip archive; checkpoints of torch < 1.6 (and _use_new_zipfile_serialization=False)
# are pickles, which start with the PROTO opcode
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


class CheckpointFormatError(ValueError):
    """A file that cannot be read as a checkpoint of model tensors."""


def header_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a torch checkpoint, judged from its first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return f"checkpoint {path!r} is empty (0 bytes)"
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO):
        return None
    return (f"{path!r} is not a torch checkpoint: it starts with {head!r}, while torch.save writes "
            f"a zip archive (starting {ZIP_MAGIC!r}) or, before torch 1.6, a pickle (starting {PICKLE_PROTO!r})")


def load_error_cause(error: Exception) -> str:
    """The informative part of a ``torch.load`` error (its weights_only messages are long)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = " ".join(lines) if lines else "no message"
    if len(cause) > 300:  # keep whole sentences (torch's zip errors go on with generic advice)
        end = cause.rfind(". ", 0, 300)
        cause = cause[: end + 1] if end > 0 else cause[:300] + "..."
    return f"{type(error).__name__}: {cause}"


def _load(path: str, allow_pickle: bool) -> Any:
    """``torch.load`` on CPU; its failure as ``CheckpointFormatError`` with the real cause."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        if not allow_pickle and "Unsupported global" in str(e):
            raise CheckpointFormatError(
                f"{path!r} holds pickled Python objects, which weights_only loading refuses ({load_error_cause(e)}). "
                f"Original-repo checkpoints store their argparse options this way: pass --allow-pickle "
                f"(allow_pickle=True) if you trust the file") from e
        raise CheckpointFormatError(
            f"cannot load {path!r} as a torch checkpoint (torch.load with weights_only={not allow_pickle}: "
            f"{load_error_cause(e)}); the file is damaged or not a checkpoint") from e


def load_model_tensors(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The model tensors of a checkpoint file: its ``model`` or ``state_dict`` entry, or its
    top level, keeping the tensor values.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointFormatError: the file is empty, not a torch checkpoint, holds pickled objects
            while ``allow_pickle`` is False, or holds no dict of tensors (each says which).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    problem = header_problem(path)
    if problem is not None:
        raise CheckpointFormatError(problem)
    ckpt = _load(path, allow_pickle)
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path!r} holds a {type(ckpt).__name__}, not a dict of model tensors")
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointFormatError(f"{path!r} holds no tensors at its top level, 'model' or 'state_dict' "
                                    f"(top-level keys: {sorted(map(str, ckpt))[:10]})")
    return tensors
