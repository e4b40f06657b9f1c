#!/usr/bin/env python
"""ONNX Runtime vs eager PyTorch inference latency per image, as a ratio, in one run.

Per config, in its own process: build the model (random initialisation, as tools/benchmark.py),
export it to ONNX (tools/export_model.py's code path, standard operators), then time one image
(a fixed-seed synthetic ``--size`` x ``--size`` one, batch 1) through

* ``eager``: the PyTorch model in eval mode, ``model([inputs])`` (preprocessing, network,
  post-processing);
* ``onnx``: :class:`maskfrozen.export.ExportedModel` (the same preprocessing and
  post-processing, the network in ONNX Runtime);

and the network alone on each side (the adapter's forward vs ``session.run``), alternating the
two sides every iteration so that a change of machine load hits both alike. Both sides use
``--threads`` threads (default 1: torch.set_num_threads, ONNX Runtime intra-op threads). The
load average is printed before and after. ``--profile N`` also prints the N ONNX Runtime node
types that take the most time (ONNX Runtime's profiler, summed per op type) and the share of
the network time each takes.

    python tools/benchmark_export.py --config-file configs/coco/detr/dino_R50_4scale_12ep.yaml \
        --config-file configs/coco/mask2former/maskformer2_R50_bs16_50ep.yaml --size 800 --profile 8

Each ``--config-file`` takes the yaml path followed by its own ``KEY=VALUE`` overrides.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import machine_description, split_overrides  # noqa: E402
from benchmark_mask_frozen import wait_for_result  # noqa: E402

__all__ = ["parse_args", "benchmark_export", "profile_by_op_type", "format_table", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", nargs="+", required=True, metavar=("YAML", "KEY=VALUE"),
                        help="a config and its overrides (repeatable)")
    parser.add_argument("--size", type=int, default=0, help="square input size (0: the config's MIN_SIZE_TEST)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per side first")
    parser.add_argument("--threads", type=int, default=1, help="threads of each side (torch and ONNX Runtime)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N ONNX Runtime op types that take the most time")
    parser.add_argument("--keep", default="", help="keep the exported model in this folder (default: a temp dir)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser.parse_args(argv)


def profile_by_op_type(profile_json: str) -> Dict[str, float]:
    """ONNX Runtime's profile (``enable_profiling``) -> seconds per op type over the whole run."""
    with open(profile_json) as f:
        events = json.load(f)
    totals: Dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            totals[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _alternating(fns: Dict[str, callable], iters: int, warmup: int) -> Dict[str, float]:
    """Mean seconds of each function, called in turn every iteration (after ``warmup`` rounds)."""
    times: Dict[str, List[float]] = defaultdict(list)
    for i in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sum(t) / len(t) for name, t in times.items()}


def _profile(model_path: str, feeds: Dict, threads: int, iters: int, workdir: str) -> Dict[str, float]:
    """Seconds per run and op type, from a separate profiled session (not the timed one)."""
    from maskfrozen.export import onnx_session

    session = onnx_session(model_path, threads, profile_prefix=os.path.join(workdir, "ort_profile"))
    for _ in range(iters):
        session.run(None, feeds)
    totals = profile_by_op_type(session.end_profiling())
    return {k: v / iters for k, v in totals.items()}


def benchmark_export(entry: List[str], args: argparse.Namespace, queue) -> None:
    """Export one config and put its timings on ``queue`` (runs in a child process)."""
    import numpy as np
    import torch
    from detectron2.modeling import build_model

    import maskfrozen  # noqa: F401
    from maskfrozen.config import load_config
    from maskfrozen.export import ExportedModel, adapter_for, export_model

    torch.set_num_threads(args.threads)
    cfg = load_config(entry[0], split_overrides(entry) + ["MODEL.DEVICE", "cpu"])
    size = args.size or cfg.INPUT.MIN_SIZE_TEST
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # random weights (as tools/benchmark.py): MODEL.WEIGHTS is not read
    adapter = adapter_for(model)
    image = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (3, size, size)).astype("float32"))
    inputs = [{"image": image, "height": size, "width": size}]
    workdir = args.keep or tempfile.mkdtemp(prefix="benchmark_export_")
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = export_model(cfg, workdir, "onnx", image.numpy().transpose(1, 2, 0).astype(np.uint8), model=model)
    export_s = time.perf_counter() - start
    exported = ExportedModel(result.model_path, cfg, num_threads=args.threads)
    with torch.no_grad():
        images = adapter.preprocess(inputs)
    graph_inputs = adapter.inputs_of(images)
    feeds = {name: x.numpy() for name, x in zip(adapter.input_names, graph_inputs)}

    def eager_network():
        with torch.no_grad():
            adapter(*graph_inputs)

    def eager_full():
        with torch.no_grad():
            model(inputs)

    times = _alternating({"eager_network": eager_network, "onnx_network": lambda: exported.session.run(None, feeds),
                          "eager_image": eager_full, "onnx_image": lambda: exported(inputs)}, args.iters, args.warmup)
    profile = _profile(result.model_path, feeds, args.threads, max(1, args.iters // 2), workdir) \
        if args.profile else {}
    queue.put({
        "config": " ".join(entry), "model": type(model).__name__, "size": size, "threads": args.threads,
        "export_s": export_s, **times,
        "speedup_image": times["eager_image"] / times["onnx_image"],
        "speedup_network": times["eager_network"] / times["onnx_network"],
        "onnx_profile_s": dict(list(profile.items())[: args.profile]) if args.profile else {},
        "onnx_profile_total_s": sum(profile.values()),
        "load_before": load_before, "load_after": os.getloadavg(), "machine": machine_description(),
        "model_path": result.model_path if args.keep else "",
    })


ROWS = [("model", "model", "{}"), ("size (px)", "size", "{}"), ("eager / image (s)", "eager_image", "{:.3f}"),
        ("ONNX Runtime / image (s)", "onnx_image", "{:.3f}"), ("speed-up (eager / ORT)", "speedup_image", "{:.2f}x"),
        ("eager network (s)", "eager_network", "{:.3f}"), ("ORT network (s)", "onnx_network", "{:.3f}"),
        ("network speed-up", "speedup_network", "{:.2f}x"), ("export (s)", "export_s", "{:.0f}")]


def format_table(results: List[Dict]) -> str:
    """One column per config."""
    lines = ["  ".join(f"{h:>26}" for h in ["", *[f"[{i + 1}]" for i in range(len(results))]])]
    for title, key, fmt in ROWS:
        lines.append("  ".join(f"{c:>26}" for c in [title, *[fmt.format(r[key]) for r in results]]))
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for i, entry in enumerate(args.config_file):
        queue = ctx.Queue()
        proc = ctx.Process(target=benchmark_export, args=(entry, args, queue))
        proc.start()
        results.append(wait_for_result(f"[{i + 1}] {entry[0]}", proc, queue))
    for i, r in enumerate(results):
        print(f"[{i + 1}] {r['config']}  ({r['size']} x {r['size']} px, {r['threads']} thread(s) each side; "
              f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f})")
    print(f"machine: {results[-1]['machine']}")
    print(format_table(results))
    for i, r in enumerate(results):
        if r["onnx_profile_s"]:
            total = r["onnx_profile_total_s"] or 1.0
            print(f"[{i + 1}] ONNX Runtime time per op type (s per image, share of the profiled network time): "
                  + ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in r["onnx_profile_s"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
