#!/usr/bin/env python
"""Convert an official (or detrex) checkpoint to maskfrozen, e.g.

    python tools/convert_checkpoint.py --format original_dino \\
        --config-file configs/coco/dino/dino_R50_4scale_12ep.yaml checkpoint0011_4scale.pth out.pth

``--format`` names the checkpoint's origin (``--help`` lists them with their repositories);
the model built from ``--config-file`` (plus ``KEY VALUE`` overrides) gives the target names
and shapes. The conversion is all or nothing: the checkpoint's keys must fit the format's key
signature (a checkpoint of another architecture is refused, naming the format that fits),
every tensor of the checkpoint must map to a model key or be one the format drops on purpose
(listed), and every model key must get a value. ``--allow-partial`` is the explicit opt-out:
it converts whatever maps. A shape mismatch is always an error listing every offending key.
On any error the exit status is 1 and nothing is written; the output is written atomically
and loads with ``MODEL.WEIGHTS out.pth``. Detectron2 ``.pkl`` checkpoints (Mask2Former, FastInst,
SOTR) hold pickled numpy arrays: they need ``--allow-pickle``.
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import maskfrozen  # noqa: E402,F401  (registers the models)
from maskfrozen.checkpoint import FORMATS, ConversionCoverageError, ConversionReport  # noqa: E402
from maskfrozen.checkpoint.formats import check_format_fits  # noqa: E402
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.engine.checkpointer import atomic_write  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The converter's command line."""
    formats = "; ".join(f"{name}: {fmt.description}" for name, fmt in sorted(FORMATS.items()))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help=f"the checkpoint's origin ({formats})")
    parser.add_argument("--config-file", required=True, help="maskfrozen config of the target model")
    parser.add_argument("--allow-partial", action="store_true",
                        help="convert whatever maps: no key-signature check, model keys may stay without a value "
                             "and checkpoint tensors unused")
    parser.add_argument("--allow-pickle", action="store_true", help="torch.load with weights_only=False")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def check_complete(report: ConversionReport) -> None:
    """Raise ``ConversionCoverageError`` when a model key got no value or a checkpoint tensor
    was left unused (not one the format drops on purpose)."""
    problems = []
    if report.unmatched_target_keys:
        problems.append(f"{len(report.unmatched_target_keys)} model keys got no value "
                        f"(e.g. {', '.join(report.unmatched_target_keys[:3])})")
    if report.unused_source_keys:
        problems.append(f"{len(report.unused_source_keys)} checkpoint tensors map to nothing "
                        f"(e.g. {', '.join(report.unused_source_keys[:3])})")
    if problems:
        raise ConversionCoverageError(
            f"incomplete conversion with --format {report.source_format}: {'; '.join(problems)}. Check the config "
            f"(variant options, layers, classes) against the checkpoint")


def convert(args: argparse.Namespace) -> ConversionReport:
    """Load, convert, check and write; raises ValueError / FileNotFoundError before writing."""
    if os.path.realpath(args.input) == os.path.realpath(args.output):
        raise ValueError(f"the output {args.output!r} is the input checkpoint: choose another path")
    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    fmt = FORMATS[args.format]
    source = fmt.load(args.input, args.allow_pickle)
    if not args.allow_partial:
        check_format_fits(args.format, list(source), repr(args.input))
    target = build_model(cfg).state_dict()
    converted, report = fmt.convert(source, target, cfg)
    print(report.summary())
    report.check_coverage(0.0)  # at least one tensor, whatever the flags
    if not args.allow_partial:
        check_complete(report)
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
        hint = " (a partial conversion on purpose: --allow-partial)" if isinstance(e, ConversionCoverageError) else ""
        raise SystemExit(f"convert_checkpoint.py: error: {e}{hint}\nnothing written to {args.output!r}") from e


if __name__ == "__main__":
    main()
