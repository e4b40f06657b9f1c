#!/usr/bin/env python
"""Model-agnostic benchmark of any maskfrozen / Detectron2 config, or of two side by side.

Per config, in its own process (so that CPU peak memory is its own): the mean time of a
training iteration (forward + backward + optimizer step of ``engine.build_optimizer``, after
warm-up), the mean inference latency per image (batch 1, eval mode, no grad), the peak
memory of the training iterations (CUDA: max allocated; CPU: growth of the process's peak
RSS) and the parameter counts. The batches are synthetic and identical for every config: a
fixed-seed ``--size`` x ``--size`` image with ``--objects`` random rectangles (boxes, classes,
bitmasks), so any model that trains on COCO instances runs. With two configs the ratios
second / first are printed. The machine (CPU model, cores, threads, load, GPU) is printed too.
``--breakdown`` also prints where a training iteration goes: the forward time of each
top-level module of the model (backbone, pixel decoder, transformer, criterion, ...: forward
hooks), the rest of the forward (the meta-arch's own code), backward and the optimizer step.

    python tools/benchmark.py --config-file configs/shapes/mask2former/maskformer2_R18.yaml \
        --config-file configs/shapes/mask_frozen_detr/dino_R18.yaml \
            MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR=True MODEL.MASK_FROZEN.DETECTOR_WEIGHTS= \
        --size 256 --batch 2 --iters 10 [--device cuda] [--threads 2] [--breakdown] [--json out.json]

Each ``--config-file`` takes the yaml path followed by its own ``KEY=VALUE`` overrides.
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from functools import partial
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_mask_frozen import wait_for_result  # noqa: E402  (a dead process is an error, never a hang)

__all__ = ["parse_args", "synthetic_batch", "machine_description", "StageTimer", "benchmark_config", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", nargs="+", required=True, metavar=("YAML", "KEY=VALUE"),
                        help="a config and its overrides; give it twice to compare two configs")
    parser.add_argument("--size", type=int, default=0, help="square input size (0: the config's MIN_SIZE_TEST)")
    parser.add_argument("--batch", type=int, default=0, help="training batch (0: the config's SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--objects", type=int, default=4, help="synthetic objects per image")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (training and inference each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--device", default="", help="cpu | cuda (default: the config's MODEL.DEVICE)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each top-level module's forward, backward and the optimizer step")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    if len(args.config_file) > 2:
        parser.error("--config-file: one config, or two to compare")
    return args


def split_overrides(entry: List[str]) -> List[str]:
    """``["x.yaml", "A.B=1", "C=x"]`` -> ``["A.B", "1", "C", "x"]`` (detectron2's opts list)."""
    opts = []
    for item in entry[1:]:
        if "=" not in item:
            raise ValueError(f"--config-file {entry[0]}: override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        opts += [key, value]
    return opts


def synthetic_batch(size: int, batch: int, objects: int, num_classes: int, seed: int = 0) -> List[Dict]:
    """``batch`` detectron2 input dicts: a random ``size`` x ``size`` uint8 image with
    ``objects`` random rectangles as instances (gt_boxes, gt_classes, gt_masks)."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        lo = torch.randint(0, size // 2, (objects, 2), generator=g)
        hi = lo + torch.randint(size // 8, size // 2, (objects, 2), generator=g)
        masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for m, (x0, y0), (x1, y1) in zip(masks, lo.tolist(), hi.tolist()):
            m[y0:y1, x0:x1] = True
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = Boxes(inst.gt_masks.get_bounding_boxes().tensor)
        inst.gt_classes = torch.randint(0, num_classes, (objects,), generator=g)
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        inputs.append({"image": image, "height": size, "width": size, "instances": inst})
    return inputs


def machine_description() -> str:
    """CPU model, cores, torch threads, load average, GPU (if any): where the numbers come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{gpu}; load average {load}")


def _timed(fn, n: int, warmup: int, cuda: bool) -> List[float]:
    """Wall times of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    import torch

    times = []
    for i in range(warmup + n):
        start = time.perf_counter()
        fn(i)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _train_step(model, optimizer, batch: List[Dict], mark: Callable[[str], None] = lambda phase: None) -> None:
    """Forward, backward, optimizer step; ``mark(phase)`` after each ("forward", "backward", "step")."""
    losses = model(batch)
    mark("forward")
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    mark("backward")
    optimizer.step()
    mark("step")


class StageTimer:
    """Seconds spent in the forward of each top-level child module of ``model`` (hooks; a child
    called several times per iteration is summed), and in the phases of the step (``mark``)."""

    def __init__(self, model, cuda: bool):
        self.cuda, self.totals, self._start, self._last = cuda, defaultdict(float), {}, 0.0
        self._handles = []
        for name, child in model.named_children():
            self._handles.append(child.register_forward_pre_hook(partial(self._begin, name)))
            self._handles.append(child.register_forward_hook(partial(self._end, name)))

    def now(self) -> float:
        """Wall time, after the device's queued work (CUDA) is done."""
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def _begin(self, name: str, module, inputs) -> None:
        self._start[name] = self.now()

    def _end(self, name: str, module, inputs, output) -> None:
        self.totals[f"forward: {name}"] += self.now() - self._start.pop(name)

    def start(self) -> None:
        """Start of an iteration: the first phase is timed from here."""
        self._last = self.now()

    def mark(self, phase: str) -> None:
        """``phase`` ended now: it took the time since the previous mark (or ``start``)."""
        now = self.now()
        self.totals[phase] += now - self._last
        self._last = now

    def per_iteration(self, iterations: int) -> Dict[str, float]:
        """Mean seconds per iteration: each child's forward, the rest of the forward, backward, step."""
        out = {k: v / iterations for k, v in self.totals.items() if k.startswith("forward: ")}
        out["forward: rest (meta-arch)"] = self.totals["forward"] / iterations - sum(out.values())
        out["backward"] = self.totals["backward"] / iterations
        out["optimizer step"] = self.totals["step"] / iterations
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _breakdown(model, optimizer, batches: List[List[Dict]], args: argparse.Namespace, cuda: bool) -> Dict[str, float]:
    """``StageTimer.per_iteration`` over ``args.iters`` training steps (after the warm-up ones)."""
    timer = StageTimer(model, cuda)
    for i in range(args.iters):
        timer.start()
        _train_step(model, optimizer, batches[i % 2], timer.mark)
    timer.remove()
    return timer.per_iteration(args.iters)


def benchmark_config(entry: List[str], args: argparse.Namespace, queue) -> None:
    """Build one config's model and put its measurements on ``queue`` (runs in a child process)."""
    import torch
    from detectron2.modeling import build_model

    import maskfrozen  # noqa: F401  (registers the models)
    from maskfrozen.config import load_config
    from maskfrozen.engine.optimizer import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(entry[0], split_overrides(entry) + (["MODEL.DEVICE", args.device] if args.device else []))
    size, batch = args.size or cfg.INPUT.MIN_SIZE_TEST, args.batch or cfg.SOLVER.IMS_PER_BATCH
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batches = [synthetic_batch(size, batch, args.objects, 5, seed=i) for i in range(2)]

    def train_step(i: int) -> None:
        _train_step(model, optimizer, batches[i % 2])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    train_times = _timed(train_step, args.iters, args.warmup, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - rss_before
    breakdown = _breakdown(model, optimizer, batches, args, cuda) if args.breakdown else {}
    model.eval()
    image = [{k: v for k, v in batches[0][0].items() if k != "instances"}]
    with torch.no_grad():
        infer_times = _timed(lambda i: model(image), args.iters, args.warmup, cuda)
    queue.put({
        "config": " ".join(entry), "model": type(model).__name__, "size": size, "batch": batch,
        "train_iter_s": sum(train_times) / len(train_times), "infer_image_s": sum(infer_times) / len(infer_times),
        "peak_memory_mb": peak, "memory": "CUDA max allocated" if cuda else "CPU peak RSS growth",
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "machine": machine_description(), "train_breakdown_s": breakdown,
    })


ROWS = [("model", "model", "{}"), ("train iteration (s)", "train_iter_s", "{:.3f}"),
        ("inference / image (s)", "infer_image_s", "{:.3f}"), ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
        ("parameters", "params", "{:,}"), ("trainable parameters", "trainable_params", "{:,}")]


def format_table(results: List[Dict]) -> str:
    """One column per config (+ ratios second / first when two)."""
    header = ["", *[f"[{i + 1}]" for i in range(len(results))]] + (["[2] / [1]"] if len(results) == 2 else [])
    lines = ["  ".join(f"{h:>24}" for h in header)]
    for title, key, fmt in ROWS:
        cells = [title, *[fmt.format(r[key]) for r in results]]
        if len(results) == 2 and key != "model":
            cells.append(f"{results[1][key] / max(results[0][key], 1e-9):.2f}x")
        lines.append("  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for i, entry in enumerate(args.config_file):
        queue = ctx.Queue()
        proc = ctx.Process(target=benchmark_config, args=(entry, args, queue))
        proc.start()
        results.append(wait_for_result(f"[{i + 1}] {entry[0]}", proc, queue))
    for i, r in enumerate(results):
        print(f"[{i + 1}] {r['config']}  ({r['size']} x {r['size']} px, train batch {r['batch']}, {r['memory']})")
    print(f"machine: {results[-1]['machine']}")
    print(format_table(results))
    for i, r in enumerate(results):
        if r["train_breakdown_s"]:
            print(f"[{i + 1}] where a training iteration goes (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r["train_breakdown_s"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
