#!/usr/bin/env python
"""Convert a public DETR checkpoint (detrex DINO / H-DETR / Deformable-DETR, or the
original Deformable-DETR / H-DETR / DINO repos) to maskfrozen's ``DeformableDETR``:

    python tools/convert_checkpoint.py --format detrex \\
        --config-file configs/coco/dino/dino_R50_4scale_12ep.yaml dino_r50_4scale_12ep.pth out.pth

The model built from the config gives the target names and shapes: a shape mismatch
stops the conversion with the list of offending keys; unused checkpoint keys and
model keys left without a value are printed (``--strict`` makes the latter an error).
The output loads with ``MODEL.WEIGHTS out.pth``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import maskfrozen  # noqa: E402,F401  (registers the models)
from maskfrozen.config import load_config  # noqa: E402
from maskfrozen.checkpoint import KEY_TABLES, convert_detr_state_dict  # noqa: E402


def load_state_dict(path: str, allow_pickle: bool):
    """The model tensors of a checkpoint file (``model`` / ``state_dict`` entry or the dict itself)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # torch raises several types for non-tensor pickles
        raise RuntimeError(
            f"cannot load {path!r} with weights_only={not allow_pickle} ({type(e).__name__}: {e}). "
            "Original-repo checkpoints hold argparse objects: pass --allow-pickle if you trust the file."
        ) from e
    for key in ("model", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
    if not tensors:
        raise ValueError(f"{path!r} holds no tensors at its top level, 'model' or 'state_dict'")
    return tensors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=sorted(KEY_TABLES))
    parser.add_argument("--config-file", required=True, help="maskfrozen config of the target model")
    parser.add_argument("--strict", action="store_true", help="fail when a model key gets no value")
    parser.add_argument("--allow-pickle", action="store_true", help="torch.load with weights_only=False")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, args.opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    target = build_model(cfg).state_dict()

    converted, report = convert_detr_state_dict(
        load_state_dict(args.input, args.allow_pickle), args.format, target, cfg.MODEL.DETR.DEC_LAYERS)
    print(report.summary())
    if args.strict and report.unmatched_target_keys:
        raise SystemExit(f"--strict: {len(report.unmatched_target_keys)} model keys have no value (listed above)")
    torch.save({"model": converted, "__author__": "maskfrozen tools/convert_checkpoint.py"}, args.output)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
