"""Multi-scale deformable attention: compiled kernels vs the grid_sample reference,
gradients, dispatch, input errors and the MSDeformAttn module."""
import math
import warnings

import pytest
import torch

import maskfrozen.ops.dispatch as msda_module
from maskfrozen.layers import MSDeformAttn
from maskfrozen.ops import BACKEND_ENV_VAR, ms_deform_attn, ms_deform_attn_reference

HAS_CPU_KERNEL = msda_module._cpu_kernel_available()
HAS_CUDA = torch.cuda.is_available()
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="maskfrozen._C is not built")
needs_cuda = pytest.mark.skipif(
    not (HAS_CUDA and msda_module._cuda_kernel_available()),
    reason="needs a GPU and maskfrozen._C built with CUDA",
)
# (device, backend) pairs whose compiled kernel is checked against the reference
KERNELS = [
    pytest.param("cpu", "cpu", marks=needs_cpu_kernel, id="cpu"),
    pytest.param("cuda", "cuda", marks=needs_cuda, id="cuda"),
]


def level_geometry(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def special_locations(spatial_shapes, count, generator, dtype):
    """Normalised coordinates on the edge cases: map borders 0 and 1, pixel centres and
    pixel edges of each level, just outside, and x = -1 px (the last place a corner is in)."""
    per_level = []
    for h, w in spatial_shapes.tolist():
        size = min(h, w)
        values = [0.0, 1.0, -0.5 / size, 1.0 + 0.5 / size, -2.0, 3.0]
        values += [(i + 0.5) / size for i in range(size)] + [i / size for i in range(size + 1)]
        values = torch.tensor(values, dtype=dtype)
        per_level.append(values[torch.randint(len(values), (count,), generator=generator)])
    return torch.stack(per_level, 0)  # [L, count]


def make_inputs(
    shapes,
    len_q,
    heads=2,
    dim=4,
    points=3,
    batch=2,
    dtype=torch.float64,
    device="cpu",
    locations="mixed",
    seed=0,
):
    """Random op inputs; locations "mixed" = uniform in [-0.2, 1.2] plus about a third
    placed exactly on special coordinates, "inside" = uniform in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, len_in = level_geometry(shapes)
    levels = len(shapes)
    value = torch.randn(batch, len_in, heads, dim, generator=g, dtype=dtype)
    loc_shape = (batch, len_q, heads, levels, points, 2)
    if locations == "inside":
        loc = torch.rand(loc_shape, generator=g, dtype=dtype) * 0.98 + 0.01
    else:
        loc = torch.rand(loc_shape, generator=g, dtype=dtype) * 1.4 - 0.2
        per_level = batch * len_q * heads * points * 2
        special = special_locations(spatial_shapes, per_level, g, dtype)  # [L, per_level]
        special = special.view(levels, 2, batch, len_q, heads, points).permute(2, 3, 4, 0, 5, 1)
        use_special = torch.rand(loc_shape, generator=g) < 0.35
        loc = torch.where(use_special, special, loc)
    weights = torch.rand(batch, len_q, heads, levels, points, generator=g, dtype=dtype)
    tensors = (value, spatial_shapes, level_start_index, loc, weights)
    return tuple(t.to(device) for t in tensors)


# shapes, len_q, heads, dim, points, batch: one level; odd sizes; head_dim not a multiple
# of any vector width; many queries (head-major path) and few (token-major path)
CASES = [
    ([(7, 13)], 9, 1, 3, 1, 1),
    ([(7, 13), (4, 7), (2, 4), (1, 1)], 30, 2, 5, 4, 2),
    ([(8, 8), (4, 4)], 80, 4, 32, 2, 1),
    ([(5, 9), (3, 5), (2, 3)], 3, 3, 16, 3, 2),
    ([(6, 10), (3, 5)], 200, 8, 8, 4, 1),
]


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(device, backend, case):
    shapes, len_q, heads, dim, points, batch = case
    for dtype, seed in ((torch.float64, 0), (torch.float32, 1)):
        inputs = make_inputs(shapes, len_q, heads, dim, points, batch, dtype=dtype, device=device, seed=seed)
        expected = ms_deform_attn(*inputs, backend="reference")
        out = ms_deform_attn(*inputs, backend=backend)
        assert out.shape == (batch, len_q, heads * dim) and out.dtype == dtype
        if dtype == torch.float64:
            assert (out - expected).abs().max().item() <= 1e-10
        else:
            scale = expected.abs().max().item()
            assert (out - expected).abs().max().item() <= 1e-5 * scale


def _grads(inputs, backend, grad_out):
    value, shapes, starts, loc, weights = (t.detach().clone() for t in inputs)
    for t in (value, loc, weights):
        t.requires_grad_(True)
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend=backend)
    out.backward(grad_out)
    return value.grad, loc.grad, weights.grad


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_reference_float64(device, backend, case):
    """Power-of-two level sizes keep the special coordinates exact in binary, so both
    implementations see the same floor() and the same one-sided location derivative."""
    _, len_q, heads, dim, points, batch = case
    shapes = [(8, 16), (4, 8), (2, 4), (1, 2)][: len(case[0])]
    inputs = make_inputs(shapes, len_q, heads, dim, points, batch, device=device, seed=3)
    grad_out = torch.randn(batch, len_q, heads * dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grad_out = grad_out.to(device)
    expected = _grads(inputs, "reference", grad_out)
    got = _grads(inputs, backend, grad_out)
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, expected):
        tol = 1e-9 * max(1.0, e.abs().max().item())
        assert (g - e).abs().max().item() <= tol, name


@needs_cpu_kernel
def test_gradcheck_cpu_kernel():
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 3)], 3, 2, 3, 2, 1, locations="inside", seed=5)
    for t in (value, loc, weights):
        t.requires_grad_(True)

    def op(v, l, w):
        return ms_deform_attn(v, shapes, starts, l, w, backend="cpu")

    assert torch.autograd.gradcheck(op, (value, loc, weights), eps=1e-6, atol=1e-7)


@needs_cpu_kernel
def test_cpu_backward_with_split_grad_value(monkeypatch):
    """One (batch, head) slice and 2 threads: the queries are split into 2 private copies
    of grad_value that are summed (the no-atomics path)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs([(8, 16), (4, 8)], 50, heads=1, dim=8, points=4, batch=1, seed=6)
        grad_out = torch.randn(1, 50, 8, dtype=torch.float64)
        for g, e in zip(_grads(inputs, "cpu", grad_out), _grads(inputs, "reference", grad_out)):
            assert torch.allclose(g, e, rtol=0, atol=1e-10)
    finally:
        torch.set_num_threads(previous)


@needs_cpu_kernel
def test_cpu_instruction_set_variants_agree():
    """The AVX-512 / AVX2 / portable builds of the inner loops give the same numbers.
    (Power-of-two sizes: with FMA contraction, loc * W - 0.5 may round differently, which
    moves samples lying exactly on a cell boundary to the other one-sided derivative.)"""
    _C = msda_module._C
    inputs = make_inputs([(8, 16), (4, 8)], 60, heads=2, dim=20, points=4, batch=1, seed=7)
    grad_out = torch.randn(1, 60, 40, dtype=torch.float64)
    original = _C.cpu_isa()
    try:
        _C.set_cpu_isa("default")
        expected = (ms_deform_attn(*inputs, backend="cpu"),) + _grads(inputs, "cpu", grad_out)
        for isa in ("avx2", "avx512"):
            try:
                _C.set_cpu_isa(isa)
            except RuntimeError:
                continue  # not supported by this CPU
            got = (ms_deform_attn(*inputs, backend="cpu"),) + _grads(inputs, "cpu", grad_out)
            for g, e in zip(got, expected):  # only the summation order differs
                assert (g - e).abs().max().item() <= 1e-12 * max(1.0, e.abs().max().item()), isa
    finally:
        _C.set_cpu_isa(original)
    with pytest.raises(RuntimeError, match="unknown CPU instruction set"):
        _C.set_cpu_isa("sse9")


@needs_cpu_kernel
def test_non_contiguous_and_low_precision_inputs():
    value, shapes, starts, loc, weights = make_inputs([(5, 6), (3, 3)], 7, heads=2, dim=4, points=2, batch=2)
    expected = ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
    # same numbers, laid out differently in memory
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    out = ms_deform_attn(value_nc, shapes, starts, loc_nc, weights_nc, backend="cpu")
    assert (out - expected).abs().max().item() <= 1e-12

    # bfloat16 is computed in float32 and returned (and differentiated) in bfloat16
    v16, l16, w16 = (t.to(torch.bfloat16).requires_grad_(True) for t in (value, loc, weights))
    out16 = ms_deform_attn(v16, shapes, starts, l16, w16, backend="cpu")
    assert out16.dtype == torch.bfloat16
    expected16 = ms_deform_attn(v16.float(), shapes, starts, l16.float(), w16.float(), backend="reference")
    assert torch.allclose(out16.float(), expected16, atol=0.05, rtol=0.02)
    out16.float().sum().backward()
    assert v16.grad.dtype == torch.bfloat16 and l16.grad.dtype == torch.bfloat16


@needs_cpu_kernel
def test_empty_queries():
    value, shapes, starts, loc, weights = make_inputs([(3, 4)], 0, heads=2, dim=4, points=2, batch=1)
    value.requires_grad_(True)
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend="cpu")
    assert out.shape == (1, 0, 8)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


# ---------------------------------------------------------------- dispatch


def test_auto_dispatch_picks_compiled_cpu_kernel(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    expected = "cpu" if HAS_CPU_KERNEL else "reference"
    assert msda_module._select_backend("auto", torch.device("cpu")) == expected


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(msda_module, "_C", None)
    monkeypatch.setattr(msda_module, "_C_IMPORT_ERROR", "ImportError: test build missing")
    monkeypatch.setattr(msda_module, "_warned", set())
    inputs = make_inputs([(3, 4)], 5, heads=1, dim=2, points=1, batch=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if "ms_deform_attn" in str(w.message)]
    assert len(messages) == 1 and "test build missing" in messages[0]
    assert torch.equal(out, ms_deform_attn_reference(inputs[0], inputs[1], inputs[3], inputs[4]))
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        ms_deform_attn(*inputs, backend="cpu")


def test_forced_backends(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert msda_module._select_backend("auto", cpu) == "reference"
    if HAS_CPU_KERNEL:
        assert msda_module._select_backend("cpu", cpu) == "cpu"  # the argument wins over the environment
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        msda_module._select_backend("auto", cpu)
    monkeypatch.delenv(BACKEND_ENV_VAR)
    with pytest.raises(ValueError, match="not one of"):
        msda_module._select_backend("triton", cpu)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        msda_module._select_backend("cuda", cpu)
    inputs = make_inputs([(3, 4)], 5, heads=1, dim=2, points=1, batch=1)
    with pytest.raises(RuntimeError, match="cuda"):
        ms_deform_attn(*inputs, backend="cuda")


@needs_cuda
def test_auto_dispatch_picks_cuda_kernel(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert msda_module._select_backend("auto", torch.device("cuda")) == "cuda"
    with pytest.raises(RuntimeError, match="backend 'cpu' needs CPU tensors"):
        msda_module._select_backend("cpu", torch.device("cuda"))


# ---------------------------------------------------------------- bad inputs


def _bad(name):
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], 5, heads=2, dim=4, points=2, batch=1)
    if name == "value_rank":
        value = value.flatten(2)
    elif name == "heads":
        loc = loc[:, :, :1]
    elif name == "weights_shape":
        weights = weights[..., :1]
    elif name == "levels":
        shapes = shapes[:1]
    elif name == "start_index":
        starts = starts + 1
    elif name == "len_in":
        value = value[:, :-1]
    elif name == "dtype":
        loc = loc.float()
    elif name == "shape_dtype":
        shapes = shapes.float()
    elif name == "device":
        loc = loc.to("meta")
    return value, shapes, starts, loc, weights


BAD_INPUTS = [
    ("value_rank", ValueError, "value must be"),
    ("heads", ValueError, "batch size or number of heads"),
    ("weights_shape", ValueError, "attention_weights must have shape"),
    ("levels", ValueError, "spatial_shapes must be"),
    ("start_index", ValueError, "level_start_index .* inconsistent"),
    ("len_in", ValueError, "Len_in=15"),
    ("dtype", TypeError, "share one dtype"),
    ("shape_dtype", TypeError, "spatial_shapes must be an integer"),
    ("device", RuntimeError, "one device"),
]


@pytest.mark.parametrize("name,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, error, match):
    for backend in ("reference", "auto"):
        with pytest.raises(error, match=match):
            ms_deform_attn(*_bad(name), backend=backend)


@needs_cpu_kernel
@pytest.mark.parametrize("name,match", [("start_index", "inconsistent"), ("len_in", "Len_in=15"), ("dtype", "dtype")])
def test_compiled_entry_points_check_inputs(name, match):
    """Direct calls of maskfrozen._C fail with a message, never read out of bounds."""
    with pytest.raises(RuntimeError, match=match):
        msda_module._C.ms_deform_attn_forward(*_bad(name))


# ---------------------------------------------------------------- MSDeformAttn module


def test_module_init_follows_deformable_detr():
    layer = MSDeformAttn(embed_dim=32, num_heads=4, num_levels=2, num_points=3)
    offsets = layer.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # head m points along angle 2*pi*m/M, scaled so the larger |component| is 1, times point index + 1
    for m in range(4):
        angle = 2 * math.pi * m / 4
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(3):
            assert torch.allclose(offsets[m, 1, p], direction * (p + 1), atol=1e-6)
    assert not layer.sampling_offsets.weight.any()
    assert not layer.attention_weights.weight.any() and not layer.attention_weights.bias.any()
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(embed_dim=30, num_heads=4)


def _module_inputs(layer, shapes, len_q, batch=2, box_refs=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, len_in = level_geometry(shapes)
    query = torch.randn(batch, len_q, layer.embed_dim, generator=g)
    value = torch.randn(batch, len_in, layer.embed_dim, generator=g)
    refs = torch.rand(batch, len_q, len(shapes), 4 if box_refs else 2, generator=g)
    return query, refs, value, spatial_shapes, level_start_index


@pytest.mark.parametrize("box_refs", [False, True])
def test_module_sampling_locations_and_backends(monkeypatch, box_refs):
    torch.manual_seed(0)
    layer = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.1)
    query, refs, value, shapes, starts = _module_inputs(layer, [(6, 8), (3, 4)], 5, box_refs=box_refs)
    offsets = layer.sampling_offsets(query).view(2, 5, 2, 2, 2, 2).detach()
    locations = layer._sampling_locations(refs, offsets, shapes)
    # query 1, head 0, level 1, point 1 by hand
    off = offsets[0, 1, 0, 1, 1]
    ref = refs[0, 1, 1]
    if box_refs:
        expected = ref[:2] + off / 2 * ref[2:] * 0.5
    else:
        expected = ref + off / torch.tensor([4.0, 3.0])
    assert torch.allclose(locations[0, 1, 0, 1, 1], expected, atol=1e-6)

    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    expected_out = layer(query, refs, value, shapes, starts)
    assert expected_out.shape == (2, 5, 16)
    if HAS_CPU_KERNEL:
        monkeypatch.setenv(BACKEND_ENV_VAR, "cpu")
        assert torch.allclose(layer(query, refs, value, shapes, starts), expected_out, atol=1e-5)


def test_module_padding_mask_hides_padded_values():
    torch.manual_seed(1)
    layer = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    query, refs, value, shapes, starts = _module_inputs(layer, [(6, 8), (3, 4)], 5)
    mask = torch.rand(value.shape[:2]) < 0.3
    out = layer(query, refs, value, shapes, starts, padding_mask=mask)
    changed = value.masked_fill(mask[..., None], 1e3)
    assert torch.allclose(layer(query, refs, changed, shapes, starts, padding_mask=mask), out, atol=1e-5)
    assert not torch.allclose(layer(query, refs, changed, shapes, starts), out, atol=1e-3)
    with pytest.raises(ValueError, match="padding_mask"):
        layer(query, refs, value, shapes, starts, padding_mask=mask.float())
    with pytest.raises(ValueError, match="reference_points"):
        layer(query, refs[..., :1], value, shapes, starts)


# ---------------------------------------------------------------- non-finite inputs


def _non_finite_inputs(dtype):
    """Inputs with NaN / infinite locations and NaN weights on chosen (query, head) pairs.
    Returns the inputs and the [Len_q, heads] pattern of outputs expected to be NaN."""
    value, shapes, starts, loc, weights = make_inputs(
        [(4, 5), (2, 3)], 6, heads=2, dim=3, points=2, batch=1, dtype=dtype, locations="inside", seed=9
    )
    nan, inf = float("nan"), float("inf")
    loc[0, 0, 0, 0, 0, 0] = nan  # query 0, head 0: x is NaN
    loc[0, 1, 1, 1, 1, 1] = nan  # query 1, head 1: y is NaN
    loc[0, 2, 0, 1, 0, 0] = inf  # query 2, head 0: x = +inf
    loc[0, 2, 1, 0, 1, 1] = -inf  # query 2, head 1: y = -inf
    loc[0, 3, 0, 0, 0] = 5.0  # query 3, head 0: a sample outside the map ...
    weights[0, 3, 0, 0, 0] = nan  # ... with a NaN weight (0 * NaN = NaN)
    weights[0, 4, 1, 1, 1] = nan  # query 4, head 1: NaN weight on a sample inside the map
    pattern = [[True, False], [False, True], [True, True], [True, False], [False, True], [False, False]]
    return (value, shapes, starts, loc, weights), pattern


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_kernel_propagates_nan_like_reference(dtype):
    inputs, pattern = _non_finite_inputs(dtype)
    expected = ms_deform_attn(*inputs, backend="reference")
    got = ms_deform_attn(*inputs, backend="cpu")
    # every channel of a poisoned (query, head) is NaN, all others are finite
    assert expected.view(6, 2, 3).isnan().all(-1).tolist() == pattern
    assert expected.view(6, 2, 3).isnan().any(-1).tolist() == pattern
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (got[finite] - expected[finite]).abs().max().item() <= tol


@needs_cpu_kernel
def test_cpu_kernel_backward_with_nan_never_hides_it():
    """Gradients: NaN wherever the reference has NaN, equal where both are finite. The
    kernel's extra NaNs are only the location gradients of samples at a non-finite
    coordinate (where grid_sample gives 0 for one component, an artefact)."""
    inputs, _ = _non_finite_inputs(torch.float64)
    grad_out = torch.randn(1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    expected = _grads(inputs, "reference", grad_out)
    got = _grads(inputs, "cpu", grad_out)
    bad_coordinate = ~torch.isfinite(inputs[3]).all(-1, keepdim=True).expand_as(inputs[3])
    allowed_extra = {"value": torch.zeros_like(got[0], dtype=torch.bool), "sampling_locations": bad_coordinate,
                     "attention_weights": torch.zeros_like(got[2], dtype=torch.bool)}
    for name, g, e in zip(("value", "sampling_locations", "attention_weights"), got, expected):
        assert bool((g.isnan() | ~e.isnan()).all()), f"{name}: a reference NaN became finite"
        extra = g.isnan() & ~e.isnan()
        assert not bool((extra & ~allowed_extra[name]).any()), f"{name}: NaN where the reference is finite"
        both = ~g.isnan() & ~e.isnan()
        assert (g[both] - e[both]).abs().max().item() <= 1e-10, name
    # location gradients: both components of the 4 samples at a bad coordinate and of the
    # 2 samples with a NaN weight; weight gradients: the 4 samples at a bad coordinate
    assert int(got[1].isnan().sum()) == 12 and int(got[2].isnan().sum()) == 4
    # value gradient: NaN only at the in-map corners read with the NaN weight (query 4, head 1)
    assert torch.equal(got[0].isnan(), expected[0].isnan())
    assert got[0].isnan().nonzero()[:, 2].unique().tolist() == [1]


# ---------------------------------------------------------------- custom ops (torch.library)


def _op_args(dtype, requires_grad):
    value, shapes, starts, loc, weights = make_inputs(
        [(3, 4), (2, 3)], 5, heads=2, dim=3, points=2, batch=2, dtype=dtype, locations="inside", seed=8
    )
    for t in (value, loc, weights):
        t.requires_grad_(requires_grad)
    return value, shapes, starts, loc, weights


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_custom_ops_pass_opcheck(dtype):
    args = _op_args(dtype, requires_grad=True)
    forward = torch.ops.maskfrozen.ms_deform_attn.default
    results = torch.library.opcheck(forward, args)
    assert results == {name: "SUCCESS" for name in results} and len(results) == 4
    out = forward(*args)
    expected = ms_deform_attn_reference(args[0], args[1], args[3], args[4])
    assert out.shape == (2, 5, 6) and (out - expected).abs().max().item() <= (1e-12 if dtype == torch.float64 else 1e-5)

    grad_out = torch.randn(2, 5, 6, dtype=dtype, generator=torch.Generator().manual_seed(11))
    backward_args = tuple(t.detach() for t in args) + (grad_out,)
    results = torch.library.opcheck(torch.ops.maskfrozen.ms_deform_attn_backward.default, backward_args)
    assert results == {name: "SUCCESS" for name in results} and len(results) == 4
    grads = torch.ops.maskfrozen.ms_deform_attn_backward(*backward_args)
    assert [tuple(g.shape) for g in grads] == [(2, 18, 2, 3), (2, 5, 2, 2, 2, 2), (2, 5, 2, 2, 2)]


def test_custom_op_fake_shapes_and_errors():
    """The fake implementations (used by compile/export) need no build and no values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _op_args(torch.float32, requires_grad=False)
    with FakeTensorMode() as mode:
        value, shapes, starts, loc, weights = (mode.from_tensor(t) for t in real)
        out = torch.ops.maskfrozen.ms_deform_attn(value, shapes, starts, loc, weights)
        assert tuple(out.shape) == (2, 5, 6) and out.dtype == torch.float32
        grad_out = torch.empty(2, 5, 6)
        grads = torch.ops.maskfrozen.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad_out)
        assert [tuple(g.shape) for g in grads] == [(2, 18, 2, 3), (2, 5, 2, 2, 2, 2), (2, 5, 2, 2, 2)]
        with pytest.raises(TypeError, match="int64 spatial_shapes, got torch.int32"):
            torch.ops.maskfrozen.ms_deform_attn(value, shapes.int(), starts, loc, weights)
        with pytest.raises(TypeError, match="float32 or float64, got value of torch.float16"):
            torch.ops.maskfrozen.ms_deform_attn(value.half(), shapes, starts, loc.half(), weights.half())
        with pytest.raises(ValueError, match=r"attention_weights must have shape \(2, 5, 2, 2, 2\)"):
            torch.ops.maskfrozen.ms_deform_attn(value, shapes, starts, loc, weights[..., :1])
        bad_grad = r"grad_output must be torch.float32 \(2, 5, 6\), got torch.float32 \(2, 5, 5\)"
        with pytest.raises(ValueError, match=bad_grad):
            torch.ops.maskfrozen.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad_out[..., :5])


def test_custom_op_without_build_says_why(monkeypatch):
    """Without maskfrozen._C the ops stay registered but refuse to run; the wrapper uses the reference."""
    monkeypatch.setattr(msda_module, "_C", None)
    monkeypatch.setattr(msda_module, "_C_IMPORT_ERROR", "ImportError: test build missing")
    args = _op_args(torch.float64, requires_grad=False)
    with pytest.raises(RuntimeError, match="compiled ops are not available.*test build missing"):
        torch.ops.maskfrozen.ms_deform_attn(*args)
    out = ms_deform_attn(*args, backend="reference")
    assert torch.equal(out, ms_deform_attn_reference(args[0], args[1], args[3], args[4]))


@needs_cpu_kernel
def test_torch_compile_fullgraph_matches_eager():
    args = _op_args(torch.float64, requires_grad=True)

    def attend(value, shapes, starts, loc, weights):
        return ms_deform_attn(value, shapes, starts, loc, weights, backend="cpu").tanh()

    eager = attend(*args)
    eager_grads = torch.autograd.grad(eager.sum(), (args[0], args[3], args[4]))
    compiled = torch.compile(attend, fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out.sum(), (args[0], args[3], args[4]))
    assert out.shape == (2, 5, 6) and (out - eager).abs().max().item() <= 1e-12
    for g, e in zip(grads, eager_grads):
        assert (g - e).abs().max().item() <= 1e-12


@needs_cpu_kernel
def test_torch_export_keeps_one_custom_op_node():
    class Attend(torch.nn.Module):
        def forward(self, value, shapes, starts, loc, weights):
            return ms_deform_attn(value, shapes, starts, loc, weights, backend="cpu")

    args = _op_args(torch.float32, requires_grad=False)
    exported = torch.export.export(Attend(), args)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.maskfrozen.ms_deform_attn.default) == 1
    assert torch.equal(exported.module()(*args), ms_deform_attn(*args, backend="cpu"))


# ---------------------------------------------------------------- no device sync


class _NoHostRead(torch.Tensor):
    """Stands in for a device tensor: while ``armed``, reading its values from Python
    (what would be a device-to-host copy and a sync) raises."""

    armed = False
    READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__", "__array__", "__eq__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if cls.armed and name in cls.READS:
            raise AssertionError(f"value read of a device tensor: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


def _as_device_geometry(monkeypatch, capacity=4):
    """Make the wrapper treat CPU tensors as device tensors, with a fresh host-copy cache."""
    cache = msda_module._HostIntCache(capacity=capacity)
    monkeypatch.setattr(msda_module, "_HOST_INTS", cache)
    monkeypatch.setattr(msda_module, "_reads_need_sync", lambda device: True)
    monkeypatch.setattr(_NoHostRead, "armed", False)
    return cache


def test_device_geometry_is_read_once(monkeypatch):
    cache = _as_device_geometry(monkeypatch)
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 3)], 5, heads=2, dim=3, points=2, batch=1)
    expected = ms_deform_attn_reference(value, shapes, loc, weights)
    shapes, starts = shapes.as_subclass(_NoHostRead), starts.as_subclass(_NoHostRead)
    backends = ["reference"] + (["cpu"] if HAS_CPU_KERNEL else [])
    ms_deform_attn(value, shapes, starts, loc, weights, backend=backends[-1])
    assert cache.reads == 2  # one copy of each geometry tensor
    monkeypatch.setattr(_NoHostRead, "armed", True)
    outs = [ms_deform_attn(value, shapes, starts, loc, weights, backend=b) for b in backends for _ in range(2)]
    assert cache.reads == 2  # later calls read nothing
    monkeypatch.setattr(_NoHostRead, "armed", False)
    for out in outs:
        assert (out.as_subclass(torch.Tensor) - expected).abs().max().item() <= 1e-12
    # an in-place change bumps the tensor's version: it is read again and the bad value caught
    shapes[1, 1] = 4
    with pytest.raises(ValueError, match=r"Len_in=18 tokens but spatial_shapes \[\[3, 4\], \[2, 4\]\] sum to 20"):
        ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
    assert cache.reads == 3


def test_host_copy_cache_is_bounded_and_never_confuses_tensors(monkeypatch):
    cache = _as_device_geometry(monkeypatch, capacity=2)
    tensors = [torch.tensor([i, i + 1]) for i in range(3)]
    assert [cache.get(t) for t in tensors] == [[0, 1], [1, 2], [2, 3]]
    assert cache.reads == 3 and len(cache._entries) == 2
    assert cache.get(tensors[2]) == [2, 3] and cache.reads == 3  # cached
    assert cache.get(tensors[0]) == [0, 1] and cache.reads == 4  # evicted, read again
    # a dead tensor's entry (still cached) never answers for a new tensor, even one that
    # reuses its id or its memory: the weak reference no longer points at the new object
    del tensors[0]
    fresh = torch.tensor([7, 7])
    assert cache.get(fresh) == [7, 7] and cache.reads == 5
    assert cache.get(fresh) == [7, 7] and cache.reads == 5


@pytest.mark.parametrize("name,match", [
    ("start_index", r"level_start_index \[1, 13\] is inconsistent with spatial_shapes \[\[3, 4\], \[2, 2\]\]"),
    ("len_in", r"Len_in=15 tokens but spatial_shapes \[\[3, 4\], \[2, 2\]\] sum to 16"),
])
def test_device_geometry_errors_name_the_values(monkeypatch, name, match):
    _as_device_geometry(monkeypatch)
    with pytest.raises(ValueError, match=match):
        ms_deform_attn(*_bad(name), backend="reference")


def test_non_positive_level_size_is_rejected(monkeypatch):
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], 5, heads=2, dim=4, points=2, batch=1)
    shapes = torch.tensor([[3, 4], [0, 2]])
    for device_path in (False, True):
        if device_path:
            _as_device_geometry(monkeypatch)
        with pytest.raises(ValueError, match=r"spatial_shapes must be positive, got \[\[3, 4\], \[0, 2\]\]"):
            ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")


@needs_cuda
def test_cuda_wrapper_does_not_sync():
    """After the first call has copied the level geometry, forward and backward run with
    CUDA's sync debug mode set to raise on any synchronising call."""
    value, shapes, starts, loc, weights = make_inputs([(8, 16), (4, 8)], 20, device="cuda", seed=12)
    for t in (value, loc, weights):
        t.requires_grad_(True)
    ms_deform_attn(value, shapes, starts, loc, weights, backend="cuda").sum().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ms_deform_attn(value, shapes, starts, loc, weights, backend="cuda")
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = ms_deform_attn(value, shapes, starts, loc, weights, backend="reference")
    assert (out - expected).abs().max().item() <= 1e-10
