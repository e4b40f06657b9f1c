#!/usr/bin/env python
"""Training cost of Mask Frozen-DETR vs the same detector + mask network trained end to end.

Both variants use the same config (detector + mask network), the same input size and
the same batches, in one run of this script:

- ``frozen``: MaskFrozenDETR as trained (detector frozen, in eval mode, under no_grad;
  only the mask network is optimised);
- ``end_to_end``: the detector unfrozen in train mode, its own DETR losses (with
  denoising / one-to-many as configured) plus the mask losses, one optimiser for all.

Reported per variant: mean time of a training iteration (forward + backward + AdamW
step, after warm-up), peak memory (CUDA: max allocated; CPU: the growth of the
process's peak RSS during the iterations, each variant in its own process) and the
number of trainable parameters, and the ratios frozen vs end-to-end.

    python tools/benchmark_mask_frozen.py --config-file configs/shapes/mask_frozen_detr/dino_R18.yaml \
        --iters 5 [--warmup 1] [KEY VALUE ...]
"""
import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr", "dino_R18.yaml")
VARIANTS = ("frozen", "end_to_end")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def build_cfg(config_file, opts):
    from maskfrozen.config import load_config

    cfg = load_config(config_file, opts, freeze=False)
    if not cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS or not os.path.isfile(cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS):
        # timing does not depend on the weights: fall back to a random detector
        cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS = ""
        cfg.MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR = True
    cfg.freeze()
    return cfg


def end_to_end_losses(model, batched_inputs):
    """Detector losses (train mode, with its denoising / one-to-many queries) + mask
    losses, gradients flowing into the detector; only the detector interface is used."""
    detector = model.detector
    images = detector.preprocess_image(batched_inputs)
    targets = detector.prepare_targets(batched_inputs, images.image_sizes)
    detected = detector.detect(images, targets)
    losses = detector.losses(detected, targets)
    preds, selected = model.predict_masks(detected)
    losses.update(model.losses(preds, selected, model.prepare_targets(batched_inputs, images)))
    return losses


def unfreeze(model):
    """Undo the freezing of the detector: trainable and following train()/eval()."""
    model.unfreeze_detector()
    model.train()
    assert all(m.training for m in model.detector.modules())


def run_variant(variant, config_file, opts, iters, warmup, threads, queue):
    import torch
    from detectron2.modeling import build_model

    from maskfrozen.engine import Trainer
    from maskfrozen.engine.optimizer import build_optimizer

    if threads:
        torch.set_num_threads(threads)
    cfg = build_cfg(config_file, opts)
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg)
    if variant == "end_to_end":
        unfreeze(model)
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(warmup + iters)]
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    step_loss = (lambda b: model(b)) if variant == "frozen" else (lambda b: end_to_end_losses(model, b))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    times = []
    for i, batch in enumerate(batches):
        if i == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        memory_kind = "CUDA max allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - rss_before
        memory_kind = "CPU peak RSS growth"
    queue.put({
        "variant": variant,
        "iter_time_s": sum(times) / len(times),
        "iter_times_s": times,
        "peak_memory_mb": peak_mb,
        "memory": memory_kind,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "input_size": [cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN],
        "batch_size": cfg.SOLVER.IMS_PER_BATCH,
    })


def wait_for_result(variant, proc, queue, poll_s: float = 1.0):
    """The result the variant's process puts on ``queue``; a RuntimeError with its exit
    code as soon as the process has died without one (never waits forever)."""
    while True:
        try:
            result = queue.get(timeout=poll_s)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # the result may have arrived just before the process exited
                    result = queue.get(timeout=poll_s)
                    break
                except queue_module.Empty:
                    raise RuntimeError(f"benchmark variant {variant!r} died without a result "
                                       f"(exit code {proc.exitcode}); its error is printed above") from None
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"benchmark variant {variant!r} failed (exit code {proc.exitcode})")
    return result


def main(argv=None):
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    results = {}
    for variant in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(variant, args.config_file, args.opts, args.iters, args.warmup,
                                                     args.threads, queue))
        proc.start()
        results[variant] = wait_for_result(variant, proc, queue)
    frozen, e2e = results["frozen"], results["end_to_end"]
    print(f"config: {args.config_file}  batch {frozen['batch_size']}  input {frozen['input_size']}")
    print(f"{'variant':<12} {'iter time (s)':>14} {'peak mem (MB)':>14} {'trainable params':>17}")
    for name, r in results.items():
        print(f"{name:<12} {r['iter_time_s']:>14.3f} {r['peak_memory_mb']:>14.0f} {r['trainable_params']:>17,}")
    ratios = {
        "iter_time_speedup": e2e["iter_time_s"] / frozen["iter_time_s"],
        "memory_ratio": e2e["peak_memory_mb"] / max(frozen["peak_memory_mb"], 1e-6),
        "trainable_params_ratio": e2e["trainable_params"] / frozen["trainable_params"],
    }
    print(f"end-to-end / frozen: iteration time x{ratios['iter_time_speedup']:.2f}, "
          f"peak memory x{ratios['memory_ratio']:.2f} ({frozen['memory']}), "
          f"trainable parameters x{ratios['trainable_params_ratio']:.1f}")
    results["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
