#!/usr/bin/env python
"""The main job behind `make demo`: Mask Frozen-DETR on the synthetic shapes, on CPU.

1. detector: train the small DINO of ``--detector-config`` on shapes_train, or reuse its
   ``model_final.pth`` when it already exists;
2. mask network: freeze that detector and train only the Mask Frozen-DETR mask network
   (``--config-file``; its ``MODEL.MASK_FROZEN.DETECTOR_WEIGHTS`` is set to the detector's
   ``model_final.pth``), then evaluate segm + bbox AP on shapes_val with COCOEvaluator;
3. write overlay PNGs of validation images to ``--output`` (default output/demo/).

Both stages log detectron2's ETA while training, and a finished stage is reused (its
``--resume``), so a second run only evaluates and draws."""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402

from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine import Trainer  # noqa: E402
from maskfrozen.engine.visualize import write_overlays  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "shapes", "mask_frozen_detr")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(CONFIGS, "demo.yaml"), help="Mask Frozen-DETR config")
    parser.add_argument("--detector-config", default=os.path.join(CONFIGS, "demo_detector.yaml"),
                        help="config of the detector to train and freeze (same MODEL section)")
    parser.add_argument("--detector-opts", nargs="*", default=[], help="KEY VALUE overrides of the detector config")
    parser.add_argument("--output", default=os.path.join("output", "demo"), help="overlay PNG folder")
    parser.add_argument("--num-images", type=int, default=8, help="validation images to draw")
    parser.add_argument("--confidence-threshold", type=float, default=0.2,
                        help="draw detections scoring at least this (class probability x mask IoU: DETR focal-loss "
                             "scores are lower than softmax ones)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides of the mask config")
    return parser.parse_args(argv)


def train_detector(cfg) -> str:
    """Train the detector unless its model_final.pth exists; returns that path."""
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(weights):
        print(f"stage 1/2: reusing the trained detector {weights}", flush=True)
        return weights
    print(f"stage 1/2: training the detector ({cfg.SOLVER.MAX_ITER} iterations) -> {weights}", flush=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    if not os.path.isfile(weights):
        raise RuntimeError(f"detector training finished without writing {weights}")
    return weights


def train_mask_network(cfg):
    """Train (or resume) the mask network on the frozen detector; returns the eval results."""
    print(f"stage 2/2: training the Mask Frozen-DETR mask network ({cfg.SOLVER.MAX_ITER} iterations) "
          f"on the frozen detector {cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS}", flush=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()  # detectron2's EvalHook evaluates at the end, prints the tables and logs the metrics
    return final_metrics(trainer) or Trainer.test(cfg, trainer.model)


def final_metrics(trainer):
    """``{"bbox": {"AP": ..}, "segm": {..}}`` from the metrics the final evaluation put in
    the trainer's event storage (empty when training was already finished: nothing ran)."""
    results = {}
    for key, (value, _) in trainer.storage.latest().items():
        task, _, metric = key.partition("/")
        if task in ("bbox", "segm") and metric:
            results.setdefault(task, {})[metric] = value
    return results


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    det_cfg = load_config(args.detector_config, args.detector_opts)
    cfg = load_config(args.config_file, args.opts, freeze=False)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False))
    detector_weights = train_detector(det_cfg)
    detector_time = time.time() - start
    cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS = detector_weights
    cfg.freeze()
    results = train_mask_network(cfg)
    mask_time = time.time() - start - detector_time
    dataset = cfg.DATASETS.TEST[0]
    images = [d["file_name"] for d in DatasetCatalog.get(dataset)][: args.num_images]
    predict_cfg = cfg.clone()
    predict_cfg.defrost()
    predict_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    written = write_overlays(predict_cfg, images, args.output, args.confidence_threshold)
    print(f"\nwrote {len(written)} overlays of {dataset} to {args.output}/")
    for task in ("bbox", "segm"):
        if task in results:
            print(f"{task} AP on {dataset}: {results[task]['AP']:.2f}")
    print(f"main job wall time: {time.time() - start:.0f} s (detector {detector_time:.0f} s, "
          f"mask network {mask_time:.0f} s)")
    return results


if __name__ == "__main__":
    main()
