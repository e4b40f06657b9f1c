"""What the official repositories need to run on this CPU-only machine, in one place:
their source tree on ``sys.path``, stand-ins for compiled modules they import but the golden
runs never call. For the compiled ``MultiScaleDeformableAttention`` extension, patch the
official module to call the pure-PyTorch ``ms_deform_attn_core_pytorch`` that the same
repository ships (its own code, not ours: the fixture must not depend on maskfrozen)."""
import contextlib
import random
import sys
import types
from typing import Iterable, Iterator

import numpy as np
import torch

__all__ = ["official_on_path", "stub_modules", "package_without_init", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs at ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stub_modules(names: Iterable[str]) -> None:
    """Empty modules under ``names`` (and their parents) unless importable already: for
    imports of compiled extensions the golden runs do not call."""
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)


def package_without_init(name: str, directory: str) -> None:
    """Register ``directory`` as package ``name`` without running its ``__init__.py`` (whose
    imports pull in datasets, timm or compiled ops the golden runs do not need): its
    submodules then import one by one, each with only its own imports."""
    package = types.ModuleType(name)
    package.__path__ = [directory]
    sys.modules[name] = package


@contextlib.contextmanager
def official_on_path(src_dir: str, drop_modules: Iterable[str] = ()) -> Iterator[None]:
    """``src_dir`` first on ``sys.path`` inside the block; modules named in ``drop_modules``
    (top-level packages that clash between repositories, e.g. ``models``, ``util``) are
    removed from ``sys.modules`` before and after, so two official repos never mix."""
    def drop():
        for mod in list(sys.modules):
            if mod.split(".")[0] in drop_modules:
                del sys.modules[mod]

    drop()
    sys.path.insert(0, src_dir)
    try:
        yield
    finally:
        sys.path.remove(src_dir)
        drop()
