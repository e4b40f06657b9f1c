#!/usr/bin/env python
"""Benchmark multi-scale deformable attention on the CPU: the pure-PyTorch reference,
maskfrozen's C++ kernel and, when installed, the PyPI package ``torch-ms-deform-attn``
(its CPU OpenMP kernel), side by side in one run.

Shapes (one image, levels (100,150), (50,75), (25,38), (13,19) = 19,947 tokens, 8 heads,
head_dim 32, 4 levels, 4 points):
  encoder  Len_q = Len_in (every token queries)
  decoder  Len_q = 300
Sampling locations:
  uniform  uniformly random in [0, 1]
  local    the query's own position (encoder: its pixel centre; decoder: a random
           reference point) plus N(0, 2 px) offsets on each level, as in a trained model

Prints median forward (no grad) and forward+backward times with each one's speed-up over
the reference, the peak memory of forward+backward (measured in a child process with a
fixed glibc mmap threshold so freed tensors leave the resident set), and the op's
arithmetic lower bound: its FLOPs at the machine's measured float32 matmul rate.

    python tools/benchmark_ops.py [--repeats 5] [--threads N] [--skip-memory]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

LEVELS = [(100, 150), (50, 75), (25, 38), (13, 19)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4
DECODER_QUERIES = 300
LOCAL_OFFSET_STD_PX = 2.0


def level_geometry():
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def pixel_centres() -> torch.Tensor:
    """[Len_in, 2] normalised (x, y) centre of every token of every level."""
    centres = []
    for h, w in LEVELS:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs, ys], -1).view(-1, 2))
    return torch.cat(centres)


def make_inputs(shape: str, locations: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, len_in = level_geometry()
    len_q = len_in if shape == "encoder" else DECODER_QUERIES
    num_levels = len(LEVELS)
    value = torch.randn(1, len_in, HEADS, HEAD_DIM, generator=g)
    loc_shape = (1, len_q, HEADS, num_levels, POINTS, 2)
    if locations == "uniform":
        loc = torch.rand(loc_shape, generator=g)
    else:
        refs = pixel_centres() if shape == "encoder" else torch.rand(len_q, 2, generator=g)
        sizes = spatial_shapes.flip(-1).to(torch.float32)  # (W, H) per level
        offsets = torch.randn(loc_shape, generator=g) * LOCAL_OFFSET_STD_PX / sizes[None, None, None, :, None, :]
        loc = (refs[None, :, None, None, None, :] + offsets).contiguous()
    weights = torch.rand(1, len_q, HEADS, num_levels, POINTS, generator=g)
    weights = (weights / weights.sum((-1, -2), keepdim=True)).contiguous()
    return value, spatial_shapes, level_start_index, loc, weights


def backends() -> Dict[str, Callable]:
    """Name -> fn(value, spatial_shapes, level_start_index, loc, weights) of those installed."""
    from maskfrozen.ops import available_backends, ms_deform_attn

    found = {"reference": lambda *a: ms_deform_attn(*a, backend="reference")}
    if "cpu" in available_backends():
        found["maskfrozen cpu"] = lambda *a: ms_deform_attn(*a, backend="cpu")
    try:
        import torch_ms_deform_attn

        version = getattr(torch_ms_deform_attn, "__version__", "?")
        found[f"torch-ms-deform-attn {version}"] = torch_ms_deform_attn.ms_deform_attn
    except ImportError:
        pass
    return found


def time_backend(fn: Callable, inputs, repeats: int):
    """Median seconds of forward (no grad) and of forward + backward."""
    value, shapes, starts, loc, weights = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]

    def forward():
        with torch.no_grad():
            fn(value, shapes, starts, loc, weights)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(torch.ones_like(out))

    results = []
    for step in (forward, forward_backward):
        step()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results.append(statistics.median(times))
    return results


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul rate (GFLOP/s) with the benchmark's thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / min(times) / 1e9


def op_flops(len_q: int, forward_only: bool) -> float:
    """Multiply-adds of the op: per sample, 4 corners x head_dim (forward); backward adds
    the grad_value scatter and the 4 dot products for the location/weight gradients."""
    samples = len_q * HEADS * len(LEVELS) * POINTS
    per_sample = 8 * HEAD_DIM if forward_only else 24 * HEAD_DIM
    return samples * per_sample


# ------------------------------------------------------------------ peak memory (child)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory_child() -> None:
    """Child mode: print JSON {shape: {backend: peak MiB of fwd+bwd above the inputs}}."""
    result: Dict[str, Dict[str, Optional[float]]] = {}
    for shape in ("encoder", "decoder"):
        inputs = make_inputs(shape, "uniform")
        result[shape] = {}
        for name, fn in backends().items():
            value, shapes, starts, loc, weights = inputs
            leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
            out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])  # warm-up
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
            del out
            baseline = _rss_kib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
            except OSError:
                result[shape][name] = None
                continue
            out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
            out.backward(torch.ones_like(out))
            result[shape][name] = (_rss_kib("VmHWM") - baseline) / 1024
            del out, leaves
    print(json.dumps(result))


def measure_memory(threads: int) -> Dict[str, Dict[str, Optional[float]]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        measure_memory_child()
        return

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    found = backends()
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; backends: {', '.join(found)}")
    gflops = matmul_gflops(args.threads)
    print(f"float32 matmul rate: {gflops:.0f} GFLOP/s")
    header = f"{'shape':8s} {'locations':9s} {'backend':28s} {'fwd ms':>9s} {'x ref':>6s} {'fwd+bwd ms':>11s} {'x ref':>6s} {'max|diff|':>9s}"
    print(header)
    print("-" * len(header))
    for shape in ("encoder", "decoder"):
        len_q = level_geometry()[2] if shape == "encoder" else DECODER_QUERIES
        for locations in ("uniform", "local"):
            inputs = make_inputs(shape, locations)
            with torch.no_grad():
                expected = found["reference"](*inputs)
            ref_times = None
            for name, fn in found.items():
                fwd, fwd_bwd = time_backend(fn, inputs, args.repeats)
                ref_times = ref_times or (fwd, fwd_bwd)
                with torch.no_grad():
                    diff = (fn(*inputs) - expected).abs().max().item()
                print(
                    f"{shape:8s} {locations:9s} {name:28s} {fwd * 1e3:9.1f} {ref_times[0] / fwd:6.1f} "
                    f"{fwd_bwd * 1e3:11.1f} {ref_times[1] / fwd_bwd:6.1f} {diff:9.1e}"
                )
        bound_fwd = op_flops(len_q, True) / (gflops * 1e9)
        bound_all = op_flops(len_q, False) / (gflops * 1e9)
        print(
            f"{shape:8s} {'-':9s} {'arithmetic lower bound':28s} {bound_fwd * 1e3:9.1f} {'':6s} {bound_all * 1e3:11.1f}"
            f"   ({op_flops(len_q, False) / 1e9:.2f} GFLOP fwd+bwd)"
        )
    if not args.skip_memory:
        memory = measure_memory(args.threads)
        print("\npeak memory of forward+backward above the inputs (MiB, uniform locations)")
        for shape, per_backend in memory.items():
            for name, mib in per_backend.items():
                print(f"  {shape:8s} {name:28s} {'n/a' if mib is None else f'{mib:9.1f}'}")


if __name__ == "__main__":
    main()
