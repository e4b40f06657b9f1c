#!/usr/bin/env python
"""Train or evaluate a maskfrozen model, exactly like detectron2's tools/train_net.py:

    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R18_FPN.yaml
    python tools/train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file X.yaml --resume          # continue an interrupted run
    python tools/train_net.py --config-file X.yaml --num-gpus 2     # DDP (CPU processes without CUDA)
    python tools/train_net.py --config-file X.yaml --dataset my_train=ann.json:images/ \\
        --dataset my_val=val.json:val_images/                       # your own COCO-format data

``--dataset`` (repeatable; same meaning in tools/demo.py) is ``NAME=JSON:IMAGE_ROOT``, which
registers the json and appends ``[NAME, JSON, IMAGE_ROOT]`` to ``DATASETS.COCO_JSON``, or a
registered ``NAME`` (e.g. ``shapes_val``, or an entry of the config's ``DATASETS.COCO_JSON``).
Unless the command line sets them, the first becomes ``DATASETS.TRAIN``, the others
``DATASETS.TEST`` (a single one is both), and the model's class count is taken from the data
(``MODEL.NUM_CLASSES_FROM_DATASET True``); a dataset that neither key then uses is a warning.
``MODEL.WEIGHTS`` must fit the model exactly; ``--allow-partial-weights``
(``MODEL.WEIGHTS_ALLOW_PARTIAL True``) loads only what fits.

A training never overwrites another run: without ``--resume``, an ``OUTPUT_DIR`` that holds a
run's ``last_checkpoint`` is an error (resume it, choose another ``OUTPUT_DIR``, or pass
``--overwrite`` to start a new run there).
"""
import logging
import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import maskfrozen  # noqa: E402,F401  (first: registers models, datasets, mappers; imports detectron2 quietly)
from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from maskfrozen.config import load_config, prepare_config  # noqa: E402
from maskfrozen.data.datasets import NUM_CLASSES_KEYS, add_dataset_flags  # noqa: E402
from maskfrozen.engine import Trainer, launch  # noqa: E402
from maskfrozen.engine.trainer import check_output_dir, forget_previous_run  # noqa: E402
from maskfrozen.engine.weights import CheckedCheckpointer, require_eval_weights  # noqa: E402

logger = logging.getLogger("maskfrozen.train_net")


def apply_dataset_args(cfg, specs: Sequence[str], opts: Sequence[str]) -> List[str]:
    """Register the ``--dataset`` values and set the (unfrozen) ``cfg`` from them (see the module
    docstring); the command-line ``opts`` win. Returns the dataset names."""
    if not specs:
        return []
    names = add_dataset_flags(cfg, specs)
    given = set(opts[0::2])
    if "DATASETS.TRAIN" not in given:
        cfg.DATASETS.TRAIN = (names[0],)
    if "DATASETS.TEST" not in given:
        cfg.DATASETS.TEST = tuple(names[1:]) or (names[0],)
    if not given & (set(NUM_CLASSES_KEYS) | {"MODEL.NUM_CLASSES_FROM_DATASET"}):
        cfg.MODEL.NUM_CLASSES_FROM_DATASET = True
    return names


def warn_unused_datasets(cfg, names: Sequence[str]) -> List[str]:
    """Log a warning for each ``--dataset`` that neither ``DATASETS.TRAIN`` nor ``DATASETS.TEST``
    uses (the command line set both): registered, but never trained on, evaluated or validated."""
    unused = [name for name in names if name not in cfg.DATASETS.TRAIN and name not in cfg.DATASETS.TEST]
    for name in unused:
        logger.warning(f"--dataset {name}: neither DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)} nor DATASETS.TEST "
                       f"{list(cfg.DATASETS.TEST)} (set on the command line) uses it, so it is neither trained on nor "
                       f"evaluated (nor validated)")
    return unused


def setup(args):
    """Config from defaults + maskfrozen keys + the file + ``--dataset`` / ``--allow-partial-weights``
    + command-line overrides, with the datasets registered, the class count resolved and the
    config checked; a training refuses an ``OUTPUT_DIR`` holding another run before writing anything."""
    late = [item for item in args.opts or [] if item.startswith("--")]
    if late:
        raise ValueError(f"options {late} come after the KEY VALUE overrides {list(args.opts)}, where they "
                         "are read as config keys: put every --option before the first KEY VALUE pair")
    opts = list(args.opts or []) + (["MODEL.WEIGHTS_ALLOW_PARTIAL", "True"] if args.allow_partial_weights else [])
    cfg = load_config(args.config_file, opts, freeze=False)
    names = apply_dataset_args(cfg, args.dataset or [], list(args.opts or []))
    cfg.freeze()
    if not args.eval_only:
        check_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite)
    # maskfrozen's own messages (class counts filled from the data, partial weights) in the log too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskfrozen", abbrev_name="mf")
    warn_unused_datasets(cfg, names)
    cfg = prepare_config(cfg)
    default_setup(cfg, args)
    return cfg


def main(args):
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in OUTPUT_DIR and --overwrite starts a new one there: "
                         "pass one of them")
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
    if args.overwrite:
        forget_previous_run(cfg.OUTPUT_DIR)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """detectron2's arguments plus ``--dataset``, ``--allow-partial-weights`` and ``--overwrite``."""
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", metavar="NAME=JSON:IMAGE_ROOT|NAME",
                        help="a COCO-format dataset to register (NAME=JSON:IMAGE_ROOT) or a registered one (NAME), "
                             "repeatable: the first trains, the others evaluate, the class count comes from its "
                             "categories (see the module docstring)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new training in an OUTPUT_DIR that holds another run's last_checkpoint "
                             "(its checkpoints are replaced); without it, that is an error")
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
