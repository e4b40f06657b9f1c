"""Multi-scale deformable attention: input checks, backend dispatch and autograd.

Backends:
    ``"cuda"``      compiled CUDA kernel (``maskfrozen._C`` built with CUDA), CUDA tensors;
    ``"cpu"``       compiled C++ kernel (parallel over queries and heads), CPU tensors;
    ``"reference"`` pure PyTorch (:func:`ms_deform_attn_reference`), any device.

``"auto"`` picks the compiled kernel for the tensors' device and otherwise falls back to
the reference with a one-time warning saying why. A backend is forced with the
``backend=`` argument or the ``MASKFROZEN_MSDA_BACKEND`` environment variable (the
argument wins); forcing one that cannot run raises ``RuntimeError``.

The compiled kernels compute in float32 or float64; float16/bfloat16 inputs are upcast
to float32 and the output is cast back (gradients flow through the casts).
"""
import os
import warnings
from typing import Optional, Set, Tuple

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "available_backends", "BACKENDS", "BACKEND_ENV_VAR"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
BACKEND_ENV_VAR = "MASKFROZEN_MSDA_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)

try:  # never fail at import: a missing build only means the reference is used
    from maskfrozen import _C

    _C_IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _C_IMPORT_ERROR = f"{type(e).__name__}: {e}"

_warned: Set[str] = set()


def _cpu_kernel_available() -> bool:
    return _C is not None


def _cuda_kernel_available() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


def available_backends() -> Tuple[str, ...]:
    """Backends this build can run (the reference always can; "cuda" also needs a GPU)."""
    names = ["reference"]
    if _cpu_kernel_available():
        names.append("cpu")
    if _cuda_kernel_available() and torch.cuda.is_available():
        names.append("cuda")
    return tuple(names)


def _why_cpu_missing() -> str:
    return (
        f"maskfrozen._C could not be imported ({_C_IMPORT_ERROR}); build it with "
        "`python setup.py build_ext --inplace` or `pip install -e .`"
    )


def _why_cuda_missing() -> str:
    if _C is None:
        return _why_cpu_missing()
    return (
        "maskfrozen._C was built without CUDA; rebuild with a CUDA toolkit "
        "(FORCE_CUDA=1 python setup.py build_ext --inplace)"
    )


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ms_deform_attn: using the slow pure-PyTorch reference: {reason}", RuntimeWarning, stacklevel=4)


def _requested_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: backend={backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    from_env = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if from_env not in BACKENDS:
        raise ValueError(f"ms_deform_attn: {BACKEND_ENV_VAR}={from_env!r} is not one of {BACKENDS}")
    return from_env


def _select_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` (argument or environment) to the one that runs on ``device``."""
    requested = _requested_backend(backend)
    if requested == "reference":
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"ms_deform_attn: backend 'cpu' needs CPU tensors, got tensors on {device}")
        if not _cpu_kernel_available():
            raise RuntimeError(f"ms_deform_attn: backend 'cpu' is not available: {_why_cpu_missing()}")
        return "cpu"
    if requested == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"ms_deform_attn: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not _cuda_kernel_available():
            raise RuntimeError(f"ms_deform_attn: backend 'cuda' is not available: {_why_cuda_missing()}")
        return "cuda"
    # auto
    if device.type == "cpu":
        if _cpu_kernel_available():
            return "cpu"
        _warn_once(_why_cpu_missing())
    elif device.type == "cuda":
        if _cuda_kernel_available():
            return "cuda"
        _warn_once(_why_cuda_missing())
    else:
        _warn_once(f"no compiled kernel for device type {device.type!r}")
    return "reference"


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise a ValueError/TypeError naming the offending input when shapes, dtypes or devices disagree."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, Len_in, n_heads, head_dim], got shape {tuple(value.shape)}")
    n, len_in, m, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be [N, Len_q, n_heads, n_levels, n_points, 2], "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    _, len_q, _, num_levels, num_points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} disagrees with value "
            f"{tuple(value.shape)} in batch size or number of heads"
        )
    if tuple(attention_weights.shape) != (n, len_q, m, num_levels, num_points):
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape {(n, len_q, m, num_levels, num_points)} "
            f"(from sampling_locations), got {tuple(attention_weights.shape)}"
        )
    if spatial_shapes.dim() != 2 or tuple(spatial_shapes.shape) != (num_levels, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [n_levels={num_levels}, 2] (H, W), got {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be [n_levels={num_levels}], got {tuple(level_start_index.shape)}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor, got {t.dtype}")
    for name, t in (("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"ms_deform_attn: {name} must be floating point, got {t.dtype}")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(
            "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got "
            f"{value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}"
        )
    tensors = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise RuntimeError(f"ms_deform_attn: all inputs must be on one device, got {devices}")
    shapes = spatial_shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {shapes}")
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"ms_deform_attn: level_start_index {level_start_index.tolist()} is inconsistent with "
            f"spatial_shapes {shapes} (expected {starts})"
        )
    if total != len_in:
        raise ValueError(
            f"ms_deform_attn: value has Len_in={len_in} tokens but spatial_shapes {shapes} sum to {total} (sum of H*W)"
        )


class _MSDeformAttnFunction(Function):
    """Autograd wrapper of the compiled forward/backward (CPU or CUDA by device)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return _C.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _C.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_locations, grad_weights


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR eq. 3).

    Args:
        value: ``[N, Len_in, n_heads, head_dim]``, the levels' maps flattened row-major
            and concatenated (``Len_in = sum(H_l * W_l)``).
        spatial_shapes: ``[n_levels, 2]`` integer (H, W) per level.
        level_start_index: ``[n_levels]`` integer offset of each level in ``Len_in``.
        sampling_locations: ``[N, Len_q, n_heads, n_levels, n_points, 2]`` normalised
            (x, y); ``(0, 0)`` is the top-left corner of the map, ``(1, 1)`` the bottom-right.
            Samples outside the map read zeros.
        attention_weights: ``[N, Len_q, n_heads, n_levels, n_points]``.
        backend: "auto", "reference", "cpu" or "cuda" (see the module docstring).

    Returns:
        ``[N, Len_q, n_heads * head_dim]`` in the dtype of ``value``. Differentiable
        w.r.t. ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = _select_backend(backend, value.device)
    if chosen == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    dtype = value.dtype
    if dtype in _UPCAST_DTYPES:
        value, sampling_locations, attention_weights = (
            t.float() for t in (value, sampling_locations, attention_weights)
        )
    elif dtype not in _KERNEL_DTYPES:
        raise TypeError(f"ms_deform_attn: unsupported dtype {dtype} (float16/bfloat16/float32/float64)")
    out = _MSDeformAttnFunction.apply(
        value, spatial_shapes.long(), level_start_index.long(), sampling_locations, attention_weights
    )
    return out.to(dtype)
