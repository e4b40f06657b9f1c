"""The fixture layout shared by every golden case (written by ``tools/golden``, read by
``tests/golden``): one folder per case,

    <case>/checkpoint.pth   the official model's weights in the official checkpoint format
    <case>/golden.pt        {"inputs": {...}, "outputs": {...}}: nested dicts/lists of tensors and
                            plain Python values (torch.load(weights_only=True) reads it)
    <case>/meta.json        official repository, commit, the official config used, seed, shims,
                            maskfrozen config + overrides that reproduce it

Tensors are stored contiguous and detached; float64 stays float64 (cases compared in float64).
"""
import json
import os
from typing import Any, Dict

import torch

__all__ = ["save_case", "load_case", "detach_tree", "MAX_CASE_BYTES"]

MAX_CASE_BYTES = 3 * 1024 * 1024


def detach_tree(value: Any) -> Any:
    """``value`` with every tensor detached, on CPU and contiguous (dicts, lists, tuples kept)."""
    if torch.is_tensor(value):
        return value.detach().cpu().contiguous().clone()
    if isinstance(value, dict):
        return {str(k): detach_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [detach_tree(v) for v in value]
    return value


def _case_bytes(case_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(case_dir, f)) for f in os.listdir(case_dir))


def save_case(out_dir: str, case: str, state_dict: Dict[str, torch.Tensor], inputs: Dict[str, Any],
              outputs: Dict[str, Any], meta: Dict[str, Any], checkpoint_wrapper: str = "model") -> str:
    """Write one case; the checkpoint is ``{checkpoint_wrapper: state_dict}`` (None: the bare
    state_dict, as Detectron2 checkpoints of some repos are). Refuses a case over 3 MB."""
    case_dir = os.path.join(out_dir, case)
    os.makedirs(case_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    torch.save(tensors if checkpoint_wrapper is None else {checkpoint_wrapper: tensors},
               os.path.join(case_dir, "checkpoint.pth"))
    torch.save({"inputs": detach_tree(inputs), "outputs": detach_tree(outputs)}, os.path.join(case_dir, "golden.pt"))
    with open(os.path.join(case_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    size = _case_bytes(case_dir)
    if size > MAX_CASE_BYTES:
        raise ValueError(f"golden case {case!r} is {size / 2**20:.2f} MB, over the 3 MB limit: shrink the model")
    print(f"wrote golden case {case_dir} ({size / 2**20:.2f} MB)")
    return case_dir


def load_case(fixtures_dir: str, case: str) -> Dict[str, Any]:
    """{"dir", "checkpoint", "inputs", "outputs", "meta"} of one case."""
    case_dir = os.path.join(fixtures_dir, case)
    if not os.path.isdir(case_dir):
        raise FileNotFoundError(f"golden case {case_dir!r} is missing: see tests/golden/README.md to regenerate it")
    data = torch.load(os.path.join(case_dir, "golden.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(case_dir, "meta.json")) as f:
        meta = json.load(f)
    return {"dir": case_dir, "checkpoint": os.path.join(case_dir, "checkpoint.pth"),
            "inputs": data["inputs"], "outputs": data["outputs"], "meta": meta}
