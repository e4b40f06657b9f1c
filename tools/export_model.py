#!/usr/bin/env python
"""Export a model to ONNX or a torch.export program (as Detectron2's tools/deploy/export_model.py):

    python tools/export_model.py --config-file configs/shapes/detr/dino_R18.yaml --format onnx \
        --output export/dino [--sample-image img.jpg] [--verify] MODEL.WEIGHTS output/dino/model_final.pth

Writes ``OUTPUT/model.onnx`` (or ``model.pt2`` with ``--format exported_program``), ``model.json``
(input/output names, preprocessing, class names, post-processing settings) and ``model.yaml``
(the config, which the predictor reads). Inputs: ``images [N, 3, H, W]`` float32, normalised
and zero-padded to a multiple of the size divisibility (dynamic N, H, W), and for the DETR
family and Mask Frozen-DETR ``image_sizes [N, 2]`` int64 (unpadded h, w). The deformable
attention becomes standard ONNX operators (GridSample, no plugin) unless
``--custom-domain-op`` asks for one ``maskfrozen.MultiScaleDeformableAttention`` node.
``--verify`` runs the sample image (or a synthetic one) through the PyTorch model and the
exported one and prints the largest output differences and whether the Instances agree.

Run the result: ``maskfrozen.export.ONNXPredictor("export/dino/model.onnx")(bgr_image)``,
or ``python tools/demo.py --onnx export/dino/model.onnx ...``.
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import maskfrozen  # noqa: E402,F401  (registers models and datasets)

from maskfrozen.config import load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", nargs="+", choices=("onnx", "exported_program"), default=["onnx"],
                        help="one or both (traced once)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--sample-image", default="", help="image to trace with (default: a synthetic one)")
    parser.add_argument("--custom-domain-op", action="store_true",
                        help="deformable attention as one maskfrozen.MultiScaleDeformableAttention node "
                             "(for runtimes with a fused kernel; ONNX Runtime cannot run it)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16 for GridSample)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size (2) instead of dynamic")
    parser.add_argument("--no-optimize", action="store_true", help="skip onnxscript's graph optimisation")
    parser.add_argument("--verify", action="store_true",
                        help="compare the exported model with the PyTorch one on the sample image")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def _sample_image(path: str, input_format: str):
    """The sample as an HxWx3 uint8 array in the model's input format, or None (synthetic)."""
    if not path:
        return None
    from detectron2.data.detection_utils import read_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sample-image {path}: no such file")
    return read_image(path, format=input_format)


def verify(cfg, model, model_path: str, image) -> bool:
    """Print the output differences and Instances agreement of an exported model; True if they agree."""
    import numpy as np
    import torch

    from maskfrozen.export import ExportedModel, adapter_for
    from maskfrozen.export.verify import compare_instances, differences_by_kind, max_abs_differences

    if image is None:
        image = np.random.default_rng(0).integers(0, 256, size=(200, 264, 3), dtype=np.uint8)
    exported = ExportedModel(model_path, cfg)
    adapter = adapter_for(model)
    chw = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    batched = [{"image": chw, "height": chw.shape[1], "width": chw.shape[2]}]
    reference, images = adapter.run_eager(batched)
    outputs = exported.run(adapter.inputs_of(images))
    diffs = differences_by_kind(max_abs_differences(reference, outputs), adapter.compared_outputs())
    with torch.no_grad():
        ours = adapter.postprocess(reference, batched, images)[0]["instances"]
    theirs = exported(batched)[0]["instances"]
    comparison = compare_instances(ours, theirs)
    print(f"{model_path}: max abs difference by output kind {diffs}")
    print(f"{model_path}: instances {comparison}")
    return comparison["classes_equal"] and comparison["max_box_diff"] <= 0.5 and comparison["min_mask_iou"] >= 0.99


def main(argv: Optional[List[str]] = None):
    """Export; returns the :class:`maskfrozen.export.ExportResult`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from maskfrozen.engine.predictor import Predictor
    from maskfrozen.export import export_model

    try:
        cfg = load_config(args.config_file, args.opts)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(e.args[0] if e.args else str(e))
    image = _sample_image(args.sample_image, cfg.INPUT.FORMAT)
    predictor = Predictor(cfg)
    result = export_model(predictor.cfg, args.output, args.format, image, custom_domain=args.custom_domain_op,
                          opset=args.opset, dynamic_batch=not args.static_batch, optimize=not args.no_optimize,
                          model=predictor.model)
    print(f"wrote {', '.join(result.model_paths.values())}, {result.metadata_path}, {result.config_path}")
    if args.verify and not all(verify(predictor.cfg, predictor.model, path, image)
                               for path in result.model_paths.values()):
        print("the exported model does NOT reproduce the PyTorch model's instances", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
