"""Multi-scale deformable attention: input checks, backend dispatch and the custom ops.

Backends:
    ``"cuda"``      compiled CUDA kernel (``maskfrozen._C`` built with CUDA), CUDA tensors;
    ``"cpu"``       compiled C++ kernel (parallel over queries and heads), CPU tensors;
    ``"reference"`` pure PyTorch (:func:`ms_deform_attn_reference`), any device.

``"auto"`` picks the compiled kernel for the tensors' device and otherwise falls back to
the reference with a one-time warning saying why; while ``torch.export`` traces, it always
records the custom op (one node, also without a build: the exported program then needs the
build to run in PyTorch, its ONNX translation, :mod:`maskfrozen.ops.onnx`, needs none).
A backend is forced with the ``backend=`` argument or the ``MASKFROZEN_MSDA_BACKEND``
environment variable (the argument wins); forcing one that cannot run raises ``RuntimeError``.

The compiled kernels compute in float32 or float64; float16/bfloat16 inputs are upcast
to float32 and the output is cast back (gradients flow through the casts).

Custom ops. The compiled kernels are registered with ``torch.library`` as
``torch.ops.maskfrozen.ms_deform_attn`` (forward) and
``torch.ops.maskfrozen.ms_deform_attn_backward`` (returns the gradients of value,
sampling_locations and attention_weights), each with a fake (shape-only) implementation,
and the forward with an autograd formula that calls the backward op. ``torch.compile``
and ``torch.export`` therefore see one opaque node per call. The ops are registered even
when ``maskfrozen._C`` is missing (calling them then raises ``RuntimeError``; the wrapper
uses the reference instead).

Input checks without a device sync. Shapes, dtypes and devices are metadata and are
checked on every call. The level geometry (positive H and W, ``level_start_index`` equal
to the running sum of H*W, sum of H*W equal to ``Len_in``) needs the values of
``spatial_shapes`` and ``level_start_index``:

* CPU tensors are read directly (no copy across devices);
* tensors on another device are read once (one device-to-host copy) and their host copy is
  cached, keyed by the tensor object (held by a weak reference, so an address reused by a
  later tensor is never mistaken for it) and stamped with ``(data_ptr, device, _version,
  shape, stride, dtype)``; an in-place change bumps ``_version`` and forces a new read.
  The cache holds the last ``_HOST_CACHE_SIZE`` tensors. A model that builds its level
  geometry once per forward pass and reuses it in every attention layer thus pays one copy
  per pass instead of one per layer and call; reusing the same tensors across passes costs
  none. (Writes through ``.data`` or from outside PyTorch bypass ``_version`` and are not
  seen.)
* while tracing (``torch.compile`` / ``torch.export``) values are not available, and the
  value checks are skipped; the compiled CPU entry point still checks them itself.

The checks always run on the host copy, so every error names the offending values.
"""
import os
import warnings
import weakref
from collections import OrderedDict
from typing import List, Optional, Set, Tuple

import torch

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "available_backends", "BACKENDS", "BACKEND_ENV_VAR"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
BACKEND_ENV_VAR = "MASKFROZEN_MSDA_BACKEND"
_KERNEL_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)
_HOST_CACHE_SIZE = 32

try:  # never fail at import: a missing build only means the reference is used
    from maskfrozen import _C

    _C_IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _C_IMPORT_ERROR = f"{type(e).__name__}: {e}"

_warned: Set[str] = set()


# ---------------------------------------------------------------- backend selection


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
    if torch.compiler.is_exporting() and device.type in ("cpu", "cuda"):
        return device.type  # the custom-op node, whatever the build: an exported graph needs no kernel
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


# ---------------------------------------------------------------- input checks: metadata


def _check_shapes(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise a ValueError naming the input whose shape disagrees with the others."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, Len_in, n_heads, head_dim], got shape {tuple(value.shape)}")
    n, _, m, _ = value.shape
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


def _check_dtypes_and_devices(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise a TypeError / RuntimeError naming the input of the wrong dtype or device."""
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
    devices = {
        "value": value.device,
        "spatial_shapes": spatial_shapes.device,
        "level_start_index": level_start_index.device,
        "sampling_locations": sampling_locations.device,
        "attention_weights": attention_weights.device,
    }
    if any(d != value.device for d in devices.values()):
        raise RuntimeError(f"ms_deform_attn: all inputs must be on one device, got {devices}")


# ---------------------------------------------------------------- input checks: values


class _HostIntCache:
    """Host copies (nested lists) of small integer tensors on devices whose reads sync.

    Entries are keyed by ``id(tensor)`` and valid while that same tensor object is alive
    (weak reference) and its stamp (data_ptr, device, _version, shape, stride, dtype) is
    unchanged. At most ``capacity`` tensors are kept, least recently used evicted first.
    ``reads`` counts the device-to-host copies made.
    """

    def __init__(self, capacity: int = _HOST_CACHE_SIZE) -> None:
        self.capacity = capacity
        self.reads = 0
        self._entries: "OrderedDict[int, Tuple[weakref.ref, tuple, list]]" = OrderedDict()

    @staticmethod
    def _stamp(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t.device, t._version, tuple(t.shape), t.stride(), t.dtype)

    def get(self, t: torch.Tensor) -> list:
        """``t.tolist()``, copied from the device only when not cached for this tensor state."""
        key, stamp = id(t), self._stamp(t)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is t and entry[1] == stamp:
            self._entries.move_to_end(key)
            return entry[2]
        values = t.tolist()  # the one device-to-host copy (and sync)
        self.reads += 1
        self._entries[key] = (weakref.ref(t), stamp, values)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return values


_HOST_INTS = _HostIntCache()


def _reads_need_sync(device: torch.device) -> bool:
    """Whether reading a tensor's values on ``device`` from Python costs a device sync."""
    return device.type != "cpu"


def _values_unavailable(t: torch.Tensor) -> bool:
    """True while tracing (compile / export, fake tensors) or for meta tensors: no values to read."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or t.device.type == "meta":
        return True
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _host_ints(t: torch.Tensor) -> list:
    """The values of ``t`` as nested lists, without a device sync after the first read."""
    if _reads_need_sync(t.device):
        return _HOST_INTS.get(t)
    return t.tolist()


def _check_levels(shapes: List[List[int]], starts: List[int], len_in: int) -> None:
    """Raise a ValueError when the level geometry does not describe ``Len_in`` tokens exactly."""
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes must be positive, got {shapes}")
    expected, total = [], 0
    for h, w in shapes:
        expected.append(total)
        total += h * w
    if list(starts) != expected:
        raise ValueError(
            f"ms_deform_attn: level_start_index {list(starts)} is inconsistent with "
            f"spatial_shapes {shapes} (expected {expected})"
        )
    if total != len_in:
        raise ValueError(
            f"ms_deform_attn: value has Len_in={len_in} tokens but spatial_shapes {shapes} sum to {total} (sum of H*W)"
        )


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> Optional[List[List[int]]]:
    """Check every input (see the module docstring for what costs a read).

    Returns the host copy of ``spatial_shapes`` ([[H, W], ...]), or None while tracing.
    Raises ValueError / TypeError / RuntimeError naming the offending input.
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _values_unavailable(spatial_shapes) or _values_unavailable(level_start_index):
        return None
    shapes = _host_ints(spatial_shapes)
    _check_levels(shapes, _host_ints(level_start_index), value.shape[1])
    return shapes


# ---------------------------------------------------------------- custom ops


def _check_kernel_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Metadata checks of the custom ops (their fake implementations run them while tracing)."""
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_dtypes_and_devices(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"ms_deform_attn: the compiled kernels take float32 or float64, got value of {value.dtype}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: the compiled kernels take an int64 {name}, got {t.dtype}")


def _compiled_module():
    """``maskfrozen._C``, or a RuntimeError saying why it is missing."""
    if _C is None:
        raise RuntimeError(f"ms_deform_attn: the compiled ops are not available: {_why_cpu_missing()}")
    return _C


@torch.library.custom_op("maskfrozen::ms_deform_attn", mutates_args=())
def _forward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Compiled forward: ``[N, Len_q, n_heads * head_dim]`` (float32/float64, int64 geometry)."""
    return _compiled_module().ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_forward_op.register_fake
def _forward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Output metadata of the forward op (no values read)."""
    _check_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("maskfrozen::ms_deform_attn_backward", mutates_args=())
def _backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compiled backward: gradients of (value, sampling_locations, attention_weights)."""
    grads = _compiled_module().ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return tuple(grads)


@_backward_op.register_fake
def _backward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient metadata of the backward op: contiguous tensors shaped like the inputs."""
    _check_kernel_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    expected = (n, sampling_locations.shape[1], m * d)
    if tuple(grad_output.shape) != expected or grad_output.dtype != value.dtype:
        raise ValueError(
            f"ms_deform_attn: grad_output must be {value.dtype} {expected}, "
            f"got {grad_output.dtype} {tuple(grad_output.shape)}"
        )
    return value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape), (
        attention_weights.new_empty(attention_weights.shape)
    )


def _setup_context(ctx, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """Save the forward op's inputs for its backward."""
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of the forward op's 5 inputs (None for the integer level geometry)."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
    )
    return grad_value, None, None, grad_locations, grad_weights


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public entry point


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
            Samples outside the map read zeros; NaN (or infinite) ones read NaN.
        attention_weights: ``[N, Len_q, n_heads, n_levels, n_points]``.
        backend: "auto", "reference", "cpu" or "cuda" (see the module docstring).

    Returns:
        ``[N, Len_q, n_heads * head_dim]`` in the dtype of ``value``. Differentiable
        w.r.t. ``value``, ``sampling_locations`` and ``attention_weights``.
    """
    host_shapes = _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = _select_backend(backend, value.device)
    if chosen == "reference":
        shapes = spatial_shapes if host_shapes is None else host_shapes
        return ms_deform_attn_reference(value, shapes, sampling_locations, attention_weights)
    dtype = value.dtype
    if dtype in _UPCAST_DTYPES:
        value, sampling_locations, attention_weights = (
            t.float() for t in (value, sampling_locations, attention_weights)
        )
    elif dtype not in _KERNEL_DTYPES:
        raise TypeError(f"ms_deform_attn: unsupported dtype {dtype} (float16/bfloat16/float32/float64)")
    out = _forward_op(value, spatial_shapes.long(), level_start_index.long(), sampling_locations, attention_weights)
    return out.to(dtype)
