#!/usr/bin/env python
"""Pretrain the shapes recipes' backbone once (the ImageNet analogue) and write it as a
backbone-only checkpoint, the ``MODEL.WEIGHTS`` of the Mask2Former / FastInst / SOTR / DETR-family
shapes configs:

    python tools/pretrain_backbone.py --config-file configs/shapes/pretrain/R18_half.yaml   # = make pretrain

The backbone is built from the config's ``MODEL.BACKBONE`` / ``MODEL.RESNETS`` exactly as the
detection configs build it; it is trained on ``DATASETS.TRAIN`` only, by classifying each object
from its features averaged inside its mask (``BackbonePretrainer``), with detectron2's loop
(progress and ETA every 20 iterations, the object accuracy on ``DATASETS.TEST`` every
``TEST.EVAL_PERIOD`` and at the end), then written atomically to ``BACKBONE_PRETRAIN.OUTPUT``.
An output already pretrained with the same config is reused (``--force`` retrains). Deterministic
given ``SEED`` (same file bit for bit on the same machine and thread count).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import maskfrozen  # noqa: E402,F401  (registers datasets, mappers, models)
from detectron2.engine import default_setup, launch  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from maskfrozen.engine.backbone_pretrain import load_pretrain_config, pretrain_backbone  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="pretraining config, e.g. configs/shapes/pretrain/R18_half.yaml")
    parser.add_argument("--force", action="store_true", help="retrain even if the output exists with this config")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (DDP; gloo CPU processes without CUDA)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    cfg = load_pretrain_config(args.config_file, args.opts)
    setup_logger(cfg.OUTPUT_DIR, name="maskfrozen", abbrev_name="mf")
    default_setup(cfg, args)
    meta = pretrain_backbone(cfg, args.config_file, force=args.force, resume=args.resume)
    print(f"backbone: {cfg.BACKBONE_PRETRAIN.OUTPUT} (val accuracy {meta['val_accuracy']}% on "
          f"{meta['val_dataset']}, {meta['train_seconds']:.0f} s of pretraining)", flush=True)
    return meta


if __name__ == "__main__":
    args = parse_args()
    launch(main, args.num_gpus, args=(args,))
