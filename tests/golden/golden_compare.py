"""Helpers of the golden tests: fixture loading (the layout of tools/golden/golden_io.py),
conversion of the official checkpoint through the converter's own code path, and tree
comparison that reports the worst difference per named tensor."""
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, os.path.join(REPO, "tools", "golden"))

from golden_io import load_case  # noqa: E402

__all__ = ["FIXTURES", "REPO", "case", "flatten", "max_abs_diff", "assert_trees_close", "convert_official"]


def case(name: str) -> Dict[str, Any]:
    """One committed fixture case (see tools/golden/golden_io.py)."""
    return load_case(FIXTURES, name)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a.b.0": leaf} of a nested dict/list/tuple tree."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: tree}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0 for two empty tensors); shapes must agree."""
    if tuple(a.shape) != tuple(b.shape):
        raise AssertionError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_trees_close(ours: Any, official: Any, atol: float = 1e-4, what: str = "") -> Dict[str, float]:
    """Every leaf of ``official`` has an equal-shaped leaf in ``ours`` within ``atol`` (integer
    and bool tensors, and plain values, exactly equal). Returns {name: max abs diff}; the
    failure lists every offending leaf with its difference."""
    flat_ours, flat_official = flatten(ours), flatten(official)
    diffs: Dict[str, float] = {}
    problems: List[str] = []
    for name, ref in flat_official.items():
        if name not in flat_ours:
            problems.append(f"{name}: missing from ours")
            continue
        mine = flat_ours[name]
        if not torch.is_tensor(ref):
            if mine != ref:
                problems.append(f"{name}: {mine!r} vs official {ref!r}")
            continue
        mine = torch.as_tensor(mine)
        try:
            diff = max_abs_diff(mine, ref)
        except AssertionError as e:
            problems.append(f"{name}: {e}")
            continue
        diffs[name] = diff
        exact = not (ref.is_floating_point() or ref.is_complex())
        if (exact and diff != 0) or diff > atol or diff != diff:
            problems.append(f"{name}: max abs diff {diff:.3g} (atol {0 if exact else atol})")
    if problems:
        raise AssertionError(f"{what} differs from the official outputs:\n  " + "\n  ".join(problems))
    return diffs


def convert_official(fmt: str, config_file: str, checkpoint: str, out_path: str,
                     opts: Tuple[str, ...] = (), extra_args: Tuple[str, ...] = ()) -> Any:
    """Run ``tools/convert_checkpoint.py`` in-process (what a user runs); its report."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    argv = ["--format", fmt, "--config-file", config_file, *extra_args, checkpoint, out_path, *opts]
    return convert_checkpoint.main(argv)
