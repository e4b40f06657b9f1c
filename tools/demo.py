#!/usr/bin/env python
"""Write prediction overlays (detectron2 Visualizer) for image files or folders:

    python tools/demo.py --config-file configs/shapes/mask_rcnn_R18_FPN.yaml \
        --input img1.jpg some_folder/ --output output/overlays MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file ... --dataset shapes_val --max-images 8 --output out/
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import DatasetCatalog  # noqa: E402

import maskfrozen  # noqa: E402,F401
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine.visualize import list_images, write_overlays  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="image files and/or folders")
    parser.add_argument("--dataset", help="use the images of this registered dataset")
    parser.add_argument("--max-images", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--output", required=True, help="folder for the overlay PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if not args.input and not args.dataset:
        parser.error("give --input files/folders or --dataset NAME")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    paths = list_images(args.input) if args.input else [d["file_name"] for d in DatasetCatalog.get(args.dataset)]
    if args.max_images > 0:
        paths = paths[: args.max_images]
    written = write_overlays(cfg, paths, args.output, args.confidence_threshold)
    print(f"wrote {len(written)} overlay(s) to {args.output}")
    return written


if __name__ == "__main__":
    main()
