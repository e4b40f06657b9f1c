#!/usr/bin/env python
"""Convert a public DETR checkpoint (detrex DINO / H-DETR / Deformable-DETR, or the
original Deformable-DETR / H-DETR / DINO repos) to maskfrozen's ``DeformableDETR``:

    python tools/convert_checkpoint.py --format detrex \\
        --config-file configs/coco/dino/dino_R50_4scale_12ep.yaml dino_r50_4scale_12ep.pth out.pth

The model built from the config gives the target names and shapes: a shape mismatch
stops the conversion with the list of offending keys; unused checkpoint keys and
model keys left without a value are printed (``--strict`` makes the latter an error).
A conversion that fills fewer than ``--min-coverage`` (default half) of the model's keys
(a wrong ``--format``, a checkpoint of another model) is an error too. On any error the
exit status is 1 and nothing is written; the output is written atomically.
The output loads with ``MODEL.WEIGHTS out.pth``. ``--format mask2former`` converts an official
Mask2Former checkpoint (model-zoo ``.pkl`` with ``--allow-pickle``, or ``.pth``) for
``QuerySegmentor``, e.g. with ``--config-file configs/coco/mask2former/maskformer2_R50_bs16_50ep.yaml``;
``--format co_detr`` a public Co-DINO (mmdet) checkpoint for a DETR config with ``MODEL.CO_DETR``
(its auxiliary heads as ``MODEL.CO_DETR.AUX_HEADS`` says, or the detector alone when Co-DETR is off),
e.g. with ``--config-file configs/coco/co_detr/co_dino_R50_5scale_12ep.yaml``; ``--format fastinst`` an
official FastInst checkpoint (junjiehe96/FastInst ``.pth``, or a ``.pkl`` with ``--allow-pickle``) for
``QuerySegmentor`` with ``FastInstDecoder``, e.g. ``fastinst_R50_ppm-fpn_x1_576_*.pth`` with
``--config-file configs/coco/fastinst/fastinst_R50_ppm-fpn_x1_576.yaml`` (D3: ``..._x3_640.yaml``).
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import maskfrozen  # noqa: E402,F401  (registers the models)
from maskfrozen.checkpoint import (  # noqa: E402
    KEY_TABLES, ConversionCoverageError, ConversionReport, convert_detr_state_dict, load_model_tensors)
from maskfrozen.checkpoint.co_detr_converter import convert_co_detr_state_dict  # noqa: E402
from maskfrozen.checkpoint.fastinst_converter import convert_fastinst_state_dict  # noqa: E402
from maskfrozen.checkpoint.mask2former_converter import (  # noqa: E402
    convert_mask2former_state_dict, load_mask2former_checkpoint)
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine.checkpointer import atomic_write  # noqa: E402


def _co_detr(source, target, cfg):
    co = cfg.MODEL.CO_DETR
    return convert_co_detr_state_dict(source, target, aux_heads=co.AUX_HEADS, include_aux_heads=co.ENABLED)


# --format -> (checkpoint loader, converter(source, target state_dict, cfg)); the DETR key tables otherwise
OTHER_FORMATS = {
    "mask2former": (load_mask2former_checkpoint, lambda source, target, cfg: convert_mask2former_state_dict(source, target)),
    "co_detr": (load_model_tensors, _co_detr),
    "fastinst": (load_mask2former_checkpoint, lambda source, target, cfg: convert_fastinst_state_dict(source, target)),
}


def build_parser() -> argparse.ArgumentParser:
    """The converter's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(KEY_TABLES) + sorted(OTHER_FORMATS))
    parser.add_argument("--config-file", required=True, help="maskfrozen config of the target model")
    parser.add_argument("--strict", action="store_true", help="fail when a model key gets no value")
    parser.add_argument("--min-coverage", type=float, default=0.5, metavar="F",
                        help="fail when fewer than this fraction of the model's keys get a value (default 0.5)")
    parser.add_argument("--allow-pickle", action="store_true", help="torch.load with weights_only=False")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def convert(args: argparse.Namespace) -> ConversionReport:
    """Load, convert, check and write; raises ValueError / FileNotFoundError before writing."""
    if os.path.realpath(args.input) == os.path.realpath(args.output):
        raise ValueError(f"the output {args.output!r} is the input checkpoint: choose another path")
    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    load, convert_fn = OTHER_FORMATS.get(args.format, (load_model_tensors, None))
    source = load(args.input, args.allow_pickle)
    target = build_model(cfg).state_dict()
    if convert_fn is not None:
        converted, report = convert_fn(source, target, cfg)
    else:
        converted, report = convert_detr_state_dict(source, args.format, target, cfg.MODEL.DETR.DEC_LAYERS)
    print(report.summary())
    report.check_coverage(args.min_coverage)
    if args.strict and report.unmatched_target_keys:
        raise ValueError(f"--strict: {len(report.unmatched_target_keys)} model keys have no value (listed above)")
    checkpoint = {"model": converted, "__author__": "maskfrozen tools/convert_checkpoint.py"}
    atomic_write(args.output, lambda f: torch.save(checkpoint, f))
    print(f"wrote {args.output}")
    return report


def main(argv: Optional[List[str]] = None) -> ConversionReport:
    """Run the conversion; an error exits with status 1, its cause, and nothing written."""
    args = build_parser().parse_args(argv)
    try:
        return convert(args)
    except (FileNotFoundError, ValueError) as e:  # CheckpointFormatError, ConversionCoverageError, shapes
        hint = " (a partial conversion on purpose: lower --min-coverage)" if isinstance(e, ConversionCoverageError) else ""
        raise SystemExit(f"convert_checkpoint.py: error: {e}{hint}\nnothing written to {args.output!r}") from e


if __name__ == "__main__":
    main()
