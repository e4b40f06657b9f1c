#!/usr/bin/env python
"""Train or evaluate a maskfrozen model, exactly like detectron2's tools/train_net.py:

    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R18_FPN.yaml
    python tools/train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file X.yaml --resume          # continue an interrupted run
    python tools/train_net.py --config-file X.yaml --num-gpus 2     # DDP (CPU processes without CUDA)
    python tools/train_net.py --config-file X.yaml --dataset my_train=ann.json:images/ \\
        --dataset my_val=val.json:val_images/                       # your own COCO-format data

``--dataset NAME=JSON:IMAGE_ROOT`` (repeatable) appends ``[NAME, JSON, IMAGE_ROOT]`` to
``DATASETS.COCO_JSON``; unless the command line sets them, the first becomes ``DATASETS.TRAIN``,
the others ``DATASETS.TEST`` (a single one is both), and the model's class count is taken from
the json (``MODEL.NUM_CLASSES_FROM_DATASET True``). ``MODEL.WEIGHTS`` must fit the model exactly;
``--allow-partial-weights`` (``MODEL.WEIGHTS_ALLOW_PARTIAL True``) loads only what fits.
"""
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import maskfrozen  # noqa: E402,F401  (registers models, datasets, mappers)
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.data.datasets import NUM_CLASSES_KEYS, apply_dataset_config, register_coco_json  # noqa: E402
from maskfrozen.engine import Trainer, launch  # noqa: E402
from maskfrozen.engine.weights import CheckedCheckpointer, require_eval_weights  # noqa: E402


def parse_dataset_arg(spec: str) -> List[str]:
    """``NAME=JSON:IMAGE_ROOT`` -> ``[NAME, abs JSON, abs IMAGE_ROOT]``, registered and validated."""
    name, _, paths = spec.partition("=")
    parts = paths.split(":")
    if not name or len(parts) != 2 or not all(parts):
        raise ValueError(f"--dataset {spec!r}: expected NAME=JSON:IMAGE_ROOT, e.g. my_train=ann.json:images/")
    register_coco_json(name, parts[0], parts[1], source=f"--dataset {spec}")
    return [name, os.path.abspath(parts[0]), os.path.abspath(parts[1])]


def apply_dataset_args(cfg, specs: Sequence[str], opts: Sequence[str]) -> None:
    """Add the ``--dataset`` entries to the (unfrozen) ``cfg``; the command-line ``opts`` win."""
    if not specs:
        return
    entries = [parse_dataset_arg(spec) for spec in specs]
    cfg.DATASETS.COCO_JSON = list(cfg.DATASETS.COCO_JSON) + entries
    given = set(opts[0::2])
    names = [entry[0] for entry in entries]
    if "DATASETS.TRAIN" not in given:
        cfg.DATASETS.TRAIN = (names[0],)
    if "DATASETS.TEST" not in given:
        cfg.DATASETS.TEST = tuple(names[1:]) or (names[0],)
    if not given & (set(NUM_CLASSES_KEYS) | {"MODEL.NUM_CLASSES_FROM_DATASET"}):
        cfg.MODEL.NUM_CLASSES_FROM_DATASET = True


def setup(args):
    """Config from defaults + maskfrozen keys + the file + ``--dataset`` / ``--allow-partial-weights``
    + command-line overrides, with the datasets registered and the class count resolved."""
    late = [item for item in args.opts or [] if item.startswith("--")]
    if late:
        raise ValueError(f"options {late} come after the KEY VALUE overrides {list(args.opts)}, where they "
                         "are read as config keys: put every --option before the first KEY VALUE pair")
    opts = list(args.opts or []) + (["MODEL.WEIGHTS_ALLOW_PARTIAL", "True"] if args.allow_partial_weights else [])
    cfg = load_config(args.config_file, opts, freeze=False)
    apply_dataset_args(cfg, args.dataset or [], list(args.opts or []))
    cfg.freeze()
    # maskfrozen's own messages (class counts filled from the data, partial weights) in the log too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskfrozen", abbrev_name="mf")
    cfg = apply_dataset_config(cfg)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = CheckedCheckpointer(model, cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL)
        require_eval_weights(cfg, checkpointer, args.resume)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """detectron2's arguments plus ``--dataset`` and ``--allow-partial-weights``."""
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", metavar="NAME=JSON:IMAGE_ROOT",
                        help="register a COCO-format dataset (repeatable): the first trains, the others "
                             "evaluate, the class count comes from its categories (see the module docstring)")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="MODEL.WEIGHTS_ALLOW_PARTIAL True: load the part of MODEL.WEIGHTS that fits the "
                             "model (fine-tuning from a backbone-only checkpoint) instead of failing")
    return parser


def cli(argv=None):
    args = argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    cli()
