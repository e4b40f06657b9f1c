#!/usr/bin/env python
"""Twin attention vs full self-attention over the same N x N grid (SOTR's complexity claim:
``O(H W^2 + H^2 W)`` instead of ``O((H W)^2)``), time and peak memory, in one run.

Both sides are the modules SOTR uses: the twin attention of a
:class:`maskfrozen.modeling.sotr.TwinTransformerLayer` (column then row attention, pre-norm,
no gate) and one :class:`maskfrozen.layers.SelfAttentionLayer`
over all ``N^2`` cells, at the paper's width (C=256, 8 heads), batch 1, forward + backward.
Each measurement runs in its own process: the time is the mean of ``--iters`` iterations after
one warm-up, the memory the growth of the process's peak RSS (CPU) or the max allocated
(CUDA) during one iteration. Two attention kernels are measured:

- ``math``: softmax(Q K^T) V with the attention matrix materialised (the public code's and the
  paper's attention; this is where the quadratic memory is);
- ``sdpa``: PyTorch's fused scaled-dot-product attention as ``nn.MultiheadAttention`` picks it
  (on CPU a flash-attention kernel that never stores the matrix).

    python tools/benchmark_twin_attention.py [--sizes 40 80] [--threads 1] [--device cpu]
"""
import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 80], help="grid sizes N")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--kernels", nargs="+", default=["math", "sdpa"], choices=["math", "sdpa"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def machine_description(device: str, threads: int) -> str:
    """CPU model, cores, threads used, load average (and the GPU when measuring on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), load average {load}"
    if device.startswith("cuda"):
        import torch

        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(variant: str, n: int, kernel: str, args: argparse.Namespace, queue) -> None:
    """Child process: (mean seconds per forward + backward, peak memory growth in bytes)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from maskfrozen.layers import SelfAttentionLayer
    from maskfrozen.modeling.sotr import TwinTransformerLayer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if variant == "twin":
        layer = TwinTransformerLayer(args.dim, args.heads, "sequential", norm="pre", gate=False, qkv_bias=True)
        module = layer.to(device).attention
        x = torch.randn(1, args.dim, n, n, device=device, requires_grad=True)
    else:
        module = SelfAttentionLayer(args.dim, args.heads, normalize_before=True).to(device)
        x = torch.randn(1, n * n, args.dim, device=device, requires_grad=True)
    def step():
        with sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext():
            module(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        memory = torch.cuda.max_memory_allocated() - base
    else:
        base = max(_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        step()
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    queue.put(((time.perf_counter() - start) / args.iters, max(memory, 0)))


def measure(variant: str, n: int, kernel: str, args: argparse.Namespace):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, n, kernel, args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{variant} N={n} {kernel}: the measuring process exited with {proc.exitcode}")
    return queue.get()


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"machine: {machine_description(args.device, args.threads)}")
    print(f"C={args.dim}, {args.heads} heads, batch 1, forward + backward, mean of {args.iters} after 1 warm-up")
    print(f"{'N':>4} {'kernel':>6} {'attn entries twin':>18} {'full':>14} | {'twin s':>8} {'full s':>8} {'ratio':>6} | "
          f"{'twin MiB':>9} {'full MiB':>9} {'ratio':>6}")
    for n in args.sizes:
        twin_entries = args.heads * (n * n * n + n * n * n)  # H columns of W^2 + W rows of H^2
        full_entries = args.heads * (n * n) ** 2
        for kernel in args.kernels:
            t_twin, m_twin = measure("twin", n, kernel, args)
            t_full, m_full = measure("full", n, kernel, args)
            mib = 1024.0 ** 2
            print(f"{n:>4} {kernel:>6} {twin_entries:>18,} {full_entries:>14,} | {t_twin:8.3f} {t_full:8.3f} "
                  f"{t_full / t_twin:6.1f} | {m_twin / mib:9.1f} {m_full / mib:9.1f} {m_full / max(m_twin, 1):6.1f}", flush=True)


if __name__ == "__main__":
    main()
