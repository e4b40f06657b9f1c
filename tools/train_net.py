#!/usr/bin/env python
"""Train or evaluate a maskfrozen model, exactly like detectron2's tools/train_net.py:

    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R18_FPN.yaml
    python tools/train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file X.yaml --resume          # continue an interrupted run
    python tools/train_net.py --config-file X.yaml --num-gpus 2     # DDP (CPU processes without CUDA)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import maskfrozen  # noqa: E402,F401  (registers models, datasets, mappers)
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine import AtomicCheckpointer, Trainer, launch  # noqa: E402


def setup(args):
    """Config from defaults + maskfrozen keys + the file + command-line overrides."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
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
