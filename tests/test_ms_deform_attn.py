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
