"""Export a built model to a ``torch.export`` program (``.pt2``) and/or ONNX (``.onnx``) from one
trace, and write the json that describes the result.

The graph is the adapter's ``forward`` (:mod:`.adapters`): preprocessed images in (normalised,
zero-padded as the model's ``preprocess_image`` pads them; with ``image_sizes`` for the models
that mask the padding), raw predictions out. Height and width are dynamic (in steps of the size
divisibility when it is > 1) from the smallest size the model allows (2 cells on its coarsest
feature map) to 4096 px; the batch is dynamic where the model allows it, else 1 (with a
warning). After tracing, the program runs once on a larger image: torch.export does not report
every specialisation, and a model whose code fixes a size is an error here rather than an ONNX
model that fails on other images.

In ONNX the deformable-attention op becomes standard operators (``GridSample``) by default, or
one ``maskfrozen.MultiScaleDeformableAttention`` node with ``custom_domain=True``
(:mod:`maskfrozen.ops.onnx`); adaptive average pooling keeps its windows dynamic
(:mod:`.onnx_ops`).
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.structures import ImageList

from .adapters import ExportAdapter, adapter_for

__all__ = ["FORMATS", "ExportResult", "sample_inputs", "export_program", "export_onnx", "export_model",
           "metadata_path", "read_metadata"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "exported_program")
_SUFFIXES = {"onnx": ".onnx", "exported_program": ".pt2"}
DEFAULT_OPSET = 18
METADATA_SUFFIX = ".json"
_MAX_SIDE = 4096  # largest padded side the dynamic dims allow (pixels)


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: one model file per format, the json and the config."""

    model_paths: Dict[str, str]  # format -> path (.onnx / .pt2)
    metadata_path: str
    config_path: str
    metadata: Dict
    program: Optional[torch.export.ExportedProgram] = None  # the traced program (in memory)

    @property
    def model_path(self) -> str:
        """The file of the first format exported."""
        return next(iter(self.model_paths.values()))


def sample_inputs(adapter: ExportAdapter, image: Optional[np.ndarray] = None, batch: int = 2,
                  size: Sequence[int] = (200, 264)) -> ImageList:
    """A preprocessed batch to trace with: ``batch`` copies of ``image`` (``HxWx3`` uint8 in the
    model's input format) or of a fixed-seed random ``size`` image, through the model's own
    ``preprocess_image``. A batch of 2 keeps the batch dimension dynamic (torch.export
    specialises sizes 0 and 1)."""
    if image is None:
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    chw = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
    h, w = chw.shape[-2:]
    return adapter.preprocess([{"image": chw, "height": h, "width": w} for _ in range(batch)])


def _dynamic_shapes(adapter: ExportAdapter, dynamic_batch: bool, min_side: int) -> Dict:
    step = max(adapter.size_divisibility, 1)
    batch = torch.export.Dim("batch", min=1, max=256) if dynamic_batch else torch.export.Dim.STATIC
    lowest = max(1, -(-min_side // step))
    height = torch.export.Dim(f"height_div{step}" if step > 1 else "height", min=lowest, max=_MAX_SIDE // step)
    width = torch.export.Dim(f"width_div{step}" if step > 1 else "width", min=lowest, max=_MAX_SIDE // step)
    if step > 1:
        height, width = step * height, step * width
    spec = {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}}
    return {name: spec[name] for name in adapter.input_names}


def _export(adapter: ExportAdapter, args, dynamic_shapes: Dict):
    with torch.no_grad():
        return torch.export.export(adapter, args, dynamic_shapes=dynamic_shapes)


def _first_image(images: ImageList) -> ImageList:
    return ImageList(images.tensor[:1], list(images.image_sizes)[:1])


def export_program(adapter: ExportAdapter, images: ImageList, dynamic_batch: bool = True):
    """``torch.export.export`` of ``adapter`` on the batch ``images`` (a batch of >= 2 for a
    dynamic batch; with ``dynamic_batch=False`` its first image: batch 1).

    Height and width are dynamic from the model's largest feature stride + 1 px (2 cells on its
    coarsest map; more where the model's code needs it: refined from torch.export's suggested
    fixes) to ``_MAX_SIDE``. A model whose code fixes the batch size is exported with batch 1 (a warning
    says so); one whose code fixes the height or width cannot be exported (ValueError with
    torch.export's explanation)."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    adapter.eval()
    if not dynamic_batch or len(images) < 2:
        dynamic_batch, images = False, _first_image(images)
    sample_side = min(images.tensor.shape[-2:])
    spec = _dynamic_shapes(adapter, dynamic_batch, min(adapter.max_stride + 1, sample_side))
    args = adapter.inputs_of(images)
    try:
        return _checked_dynamic(_export(adapter, args, spec), adapter, images)
    except torch._dynamo.exc.UserError as e:
        refined = refine_dynamic_shapes_from_suggested_fixes(e.msg, spec)
        message = e.msg
    fixed = [name for name, dim in (("height", refined["images"][2]), ("width", refined["images"][3]))
             if isinstance(dim, int)]
    if fixed:
        raise ValueError(f"{type(adapter.model).__name__}: torch.export found that the model's code fixes the image "
                         f"{' and '.join(fixed)}, so it cannot be exported with dynamic image sizes:\n{message}")
    if dynamic_batch and isinstance(refined["images"][0], int):
        logger.warning("%s: the model's code fixes the batch size; exporting with batch 1",
                       type(adapter.model).__name__)
        return export_program(adapter, images, dynamic_batch=False)
    return _checked_dynamic(_export(adapter, args, refined), adapter, images)


def _checked_dynamic(program, adapter: ExportAdapter, images: ImageList):
    """``program`` after running it on a larger image than the traced one: torch.export does
    not flag every specialisation (e.g. ``linspace`` over a feature map's size), but the
    exported program's input guards then fail; that is a ValueError naming the guard."""
    step = max(adapter.size_divisibility, 32)
    n, c, h, w = images.tensor.shape
    larger = ImageList(images.tensor.new_zeros(n, c, h + step, w + step),
                       [(a + step, b + step) for a, b in images.image_sizes])
    try:
        with torch.no_grad():
            program.module()(*adapter.inputs_of(larger))
    except AssertionError as e:  # the exported program's guards on its input shapes
        raise ValueError(f"{type(adapter.model).__name__}: the exported program only accepts the traced image size "
                         f"{h}x{w} (the model's code fixes a size that torch.export did not report): {e}") from e
    return program


def export_onnx(program, adapter: ExportAdapter, path: str, custom_domain: bool = False,
                opset: int = DEFAULT_OPSET, optimize: bool = True):
    """Convert an exported program to ONNX at ``path`` (named inputs/outputs, one file).

    ``optimize``: onnxscript's graph optimisation (constant folding, redundancy removal). When it
    fails (onnxscript 0.7 folds SOTR's split wrongly: "Error during constant folding for node
    ...SplitToSequence") the unoptimised graph is written, with a warning; ONNX Runtime
    optimises the graph again when it loads it."""
    import onnx_ir as ir

    from .onnx_ops import translation_table

    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, input_names=list(adapter.input_names),
        output_names=list(adapter.output_names), custom_translation_table=translation_table(custom_domain),
        optimize=False, external_data=False)
    if optimize:
        unoptimized = ir.to_proto(onnx_program.model)
        try:
            onnx_program.optimize()
        except Exception as e:  # an onnxscript optimiser bug must not cost the export
            logger.warning("onnxscript's graph optimisation failed (%s: %s); writing the unoptimised graph",
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            onnx_program.model = ir.from_proto(unoptimized)
    onnx_program.save(path, external_data=False)
    return onnx_program


def has_dynamic_batch(program) -> bool:
    """Whether the exported program's first input has a symbolic batch size."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            return isinstance(node.meta["val"].shape[0], torch.SymInt)
    return False


def metadata_path(model_path: str) -> str:
    """The json written beside an exported model file."""
    return os.path.splitext(model_path)[0] + METADATA_SUFFIX


def read_metadata(model_path: str) -> Dict:
    """The json of an exported model (an error naming the file when it is missing)."""
    path = metadata_path(model_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the json that tools/export_model.py writes beside {model_path} is missing "
                                f"(it holds the preprocessing and the config the predictor needs)")
    with open(path) as f:
        return json.load(f)


def _class_names(cfg: CfgNode) -> List[str]:
    for names in (cfg.DATASETS.TEST, cfg.DATASETS.TRAIN):
        if len(names):
            return list(MetadataCatalog.get(names[0]).get("thing_classes", []) or [])
    return []


def _metadata(cfg: CfgNode, adapter: ExportAdapter, files: Dict[str, str], config_file: str,
              custom_domain: bool, opset: int, dynamic_batch: bool) -> Dict:
    import maskfrozen

    step = max(adapter.size_divisibility, 1)
    batch = "batch" if dynamic_batch else 1
    side = "{} (a multiple of %d)" % step if step > 1 else "{}"
    shapes = {"images": [batch, 3, side.format("height"), side.format("width")], "image_sizes": [batch, 2]}
    return {
        "files": files,
        "config_file": config_file,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "adapter": type(adapter).__name__,
        "inputs": [{"name": n, "shape": shapes[n], "dtype": "float32" if n == "images" else "int64"}
                   for n in adapter.input_names],
        "outputs": list(adapter.output_names),
        "output_kinds": adapter.compared_outputs(),
        "preprocessing": {
            "input_format": cfg.INPUT.FORMAT,
            **adapter.preprocessing(),
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "steps": "resize (shortest edge to min_size_test, longest <= max_size_test), CHW float32 in "
                     "input_format, (x - pixel_mean) / pixel_std, zero-pad bottom/right to a multiple of "
                     "size_divisibility (0: to the largest image of the batch); image_sizes = the unpadded (h, w)",
        },
        "postprocessing": adapter.postprocessing_parameters(),
        "class_names": _class_names(cfg),
        "ms_deform_attn": "custom_domain" if custom_domain else "standard_onnx",
        "opset": opset if "onnx" in files else None,
        "versions": {"maskfrozen": maskfrozen.__version__, "torch": torch.__version__},
    }


def export_model(cfg: CfgNode, output_dir: str, formats: Sequence[str] = ("onnx",), image: Optional[np.ndarray] = None,
                 custom_domain: bool = False, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                 optimize: bool = True, model: Optional[torch.nn.Module] = None,
                 name: str = "model") -> ExportResult:
    """Build the model of ``cfg`` (weights from ``MODEL.WEIGHTS``, checked as the predictor loads
    them) unless ``model`` is given, trace it once and write each of ``formats`` to
    ``output_dir/<name>.onnx`` / ``<name>.pt2``, with ``<name>.json`` (module doc) and
    ``<name>.yaml`` (the config) beside them."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats {formats}: each must be one of {FORMATS}")
    if model is None:
        from maskfrozen.engine.predictor import Predictor

        model = Predictor(cfg).model
    model.eval()
    adapter = adapter_for(model)
    side = int(cfg.INPUT.MIN_SIZE_TEST) or 200  # the synthetic sample: a typical test image (shape only)
    program = export_program(adapter, sample_inputs(adapter, image, size=(side, side * 4 // 3)), dynamic_batch)
    os.makedirs(output_dir, exist_ok=True)
    files = {fmt: f"{name}{_SUFFIXES[fmt]}" for fmt in formats}
    for fmt, file in files.items():
        path = os.path.join(output_dir, file)
        if fmt == "onnx":
            export_onnx(program, adapter, path, custom_domain, opset, optimize)
        else:
            torch.export.save(program, path)
    config_file = f"{name}.yaml"
    with open(os.path.join(output_dir, config_file), "w") as f:
        f.write(cfg.dump())
    meta = _metadata(cfg, adapter, files, config_file, custom_domain, opset, has_dynamic_batch(program))
    json_path = os.path.join(output_dir, f"{name}{METADATA_SUFFIX}")
    with open(json_path, "w") as f:
        json.dump(meta, f, indent=2)
    return ExportResult({fmt: os.path.join(output_dir, file) for fmt, file in files.items()}, json_path,
                        os.path.join(output_dir, config_file), meta, program)
