#!/usr/bin/env python
"""Write prediction overlays (detectron2 Visualizer) for image files or folders:

    python tools/demo.py --config-file configs/shapes/mask_rcnn_R18_FPN.yaml \
        --input img1.jpg some_folder/ --output output/overlays MODEL.WEIGHTS model_final.pth
    python tools/demo.py --config-file output/my_dino/config.yaml --dataset my_val --max-images 8 \
        --output out/ MODEL.WEIGHTS output/my_dino/model_final.pth

MODEL.WEIGHTS is required (a trained model; --allow-random-weights draws an untrained one on
purpose). ``--dataset`` means what it means in tools/train_net.py (repeatable): ``NAME`` is a
registered dataset, the config's own ``DATASETS.COCO_JSON`` entries included (a training run's
``OUTPUT_DIR/config.yaml`` records its datasets there), and ``NAME=JSON:IMAGE_ROOT`` registers a
COCO json. Its images are drawn (after the --input ones) with its class names, which must be
the model's (the config's ``DATASETS.TRAIN`` classes). Every input image gets its own overlay
<name>.png; images of the same name (from different folders) get <name>_1.png, <name>_2.png, ...
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import maskfrozen  # noqa: E402,F401  (first: registers models and datasets; imports detectron2 quietly)
from detectron2.data import DatasetCatalog  # noqa: E402

from maskfrozen.config import load_config, prepare_config  # noqa: E402
from maskfrozen.data.datasets import DATASET_FLAG_FORMS, add_dataset_flags  # noqa: E402
from maskfrozen.engine.visualize import list_images, weights_problem, write_overlays  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="image files and/or folders")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_ROOT|NAME",
                        help=f"draw the images of this dataset (repeatable): {DATASET_FLAG_FORMS}")
    parser.add_argument("--max-images", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--output", required=True, help="folder for the overlay PNGs")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even without MODEL.WEIGHTS (an untrained, randomly initialised model)")
    parser.add_argument("--onnx", default="", metavar="MODEL.onnx",
                        help="predict with this exported model (tools/export_model.py; ONNX Runtime, or a .pt2 "
                             "torch.export program) instead of MODEL.WEIGHTS")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def demo_config(args, parser: argparse.ArgumentParser):
    """The config with the ``--dataset`` datasets registered (and set as ``DATASETS.TEST``, whose
    class names the overlays show), resolved and checked; returns ``(cfg, dataset names)``.
    A bad dataset or config is a usage error naming it."""
    cfg = load_config(args.config_file, args.opts, freeze=False)
    try:
        names = add_dataset_flags(cfg, args.dataset)
        if names:
            cfg.DATASETS.TEST = tuple(names)
        cfg.freeze()
        return prepare_config(cfg), names
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(e.args[0] if e.args else str(e))


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Write the overlays; returns their paths. Usage errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.input and not args.dataset:
        parser.error("give --input files/folders or --dataset NAME (or NAME=JSON:IMAGE_ROOT)")
    cfg, names = demo_config(args, parser)
    problem = None if args.onnx else weights_problem(cfg)  # an exported model holds its weights
    if problem and not (args.allow_random_weights and not cfg.MODEL.WEIGHTS):  # Predictor warns then
        parser.error(problem)
    paths = list_images(args.input) if args.input else []
    paths += [d["file_name"] for name in names for d in DatasetCatalog.get(name)]
    if args.max_images > 0:
        paths = paths[: args.max_images]
    predictor = None
    if args.onnx:
        from maskfrozen.export import ONNXPredictor

        predictor = ONNXPredictor(args.onnx, cfg)
    written = write_overlays(cfg, paths, args.output, args.confidence_threshold, predictor)
    print(f"wrote {len(written)} overlay(s) to {args.output}")
    return written


if __name__ == "__main__":
    main()
