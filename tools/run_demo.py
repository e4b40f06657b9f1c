#!/usr/bin/env python
"""The main job behind `make demo` (the Mask Frozen-DETR pipeline is
tools/run_mask_frozen_demo.py, `make demo-mask-frozen`): train Detectron2's Mask R-CNN (ResNet-18-FPN, random
init) on the synthetic shapes on CPU, evaluate it with COCOEvaluator (bbox and segm tables)
and write overlay PNGs of validation images to output/demo/.

A finished training run in the output folder is reused (detectron2's --resume), so a
second `make demo` only evaluates and draws."""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.engine import default_setup  # noqa: E402

import maskfrozen  # noqa: E402,F401
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine import Trainer  # noqa: E402
from maskfrozen.engine.visualize import write_overlays  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes", "mask_rcnn_R18_FPN.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default=os.path.join("output", "demo"), help="overlay PNG folder")
    parser.add_argument("--num-images", type=int, default=8, help="validation images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False))
    start = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()  # evaluates at the end (detectron2's EvalHook) and prints the tables
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    dataset = cfg.DATASETS.TEST[0]
    images = [d["file_name"] for d in DatasetCatalog.get(dataset)][: args.num_images]
    predict_cfg = cfg.clone()
    predict_cfg.defrost()
    predict_cfg.MODEL.WEIGHTS = weights
    written = write_overlays(predict_cfg, images, args.output)
    print(f"\nwrote {len(written)} overlays of {dataset} to {args.output}/")
    for task in ("bbox", "segm"):
        if task in results:
            print(f"{task} AP on {dataset}: {results[task]['AP']:.2f}")
    print(f"main job wall time: {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
