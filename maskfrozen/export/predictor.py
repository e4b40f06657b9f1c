"""Run an exported model (ONNX Runtime, or a ``torch.export`` program) behind the same
interfaces as the PyTorch model.

* :class:`ExportedModel` is called like a Detectron2 model in eval mode:
  ``model(batched_inputs) -> [{"instances": Instances}]``. Preprocessing is the model's own
  function (``normalized_image_batch`` with the exported mean / std / size divisibility), the
  network runs in ONNX Runtime (or as the exported program), and the post-processing is the
  PyTorch model's own ``inference`` (through its :class:`~.adapters.ExportAdapter`): a model
  built from the exported config on the CPU, whose weights are never used.
* :class:`ONNXPredictor` is :class:`maskfrozen.Predictor` (detectron2's ``DefaultPredictor``:
  input checks, BGR/RGB, ``ResizeShortestEdge``) on an :class:`ExportedModel`:

      predictor = ONNXPredictor("export/model.onnx")
      instances = predictor(cv2.imread("image.jpg"))["instances"]
"""
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY

from maskfrozen.engine.predictor import Predictor
from maskfrozen.modeling.inputs import normalized_image_batch

from .adapters import ExportAdapter, adapter_for
from .exporter import read_metadata

__all__ = ["ExportedModel", "ONNXPredictor", "postprocessing_model", "onnx_session"]

logger = logging.getLogger(__name__)


def _config_of(model_path: str, meta: Dict) -> CfgNode:
    from maskfrozen.config import load_config

    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), meta["config_file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the config that tools/export_model.py writes beside {model_path} is missing")
    return load_config(path, freeze=True)


def postprocessing_model(cfg: CfgNode) -> torch.nn.Module:
    """The PyTorch model of ``cfg`` on the CPU in eval mode, randomly initialised: only its
    post-processing runs (its ``inference`` reads settings, never weights). Mask Frozen-DETR's
    detector checkpoint is not read."""
    from maskfrozen.config import prepare_config

    cfg = prepare_config(cfg).clone()  # datasets and class counts resolved as the PyTorch predictor does
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    if cfg.MODEL.META_ARCHITECTURE == "MaskFrozenDETR":
        cfg.MODEL.MASK_FROZEN.DETECTOR_WEIGHTS = ""
        cfg.MODEL.MASK_FROZEN.ALLOW_RANDOM_DETECTOR = True
    quiet = logging.getLogger("maskfrozen.modeling.mask_frozen.meta_arch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "RANDOM detector" warning does not apply here
    try:
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    finally:
        quiet.setLevel(level)
    return model.eval()


def onnx_session(path: str, num_threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 profile_prefix: str = ""):
    """An ONNX Runtime session (``num_threads`` intra-op threads, 0: ONNX Runtime's default;
    ``profile_prefix``: write ONNX Runtime's per-node profile with that prefix)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(f"running an ONNX model needs onnxruntime: pip install 'maskfrozen[export]' ({e})") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only (not its constant-folding notes)
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=list(providers))


class ExportedModel:
    """An exported model (``.onnx`` or ``.pt2``) called like the PyTorch model in eval mode.

    Args:
        model_path: the file tools/export_model.py wrote (its ``.json`` and ``.yaml`` beside it).
        cfg: the config (default: the exported one).
        num_threads: ONNX Runtime intra-op threads (0: its default).
        providers: ONNX Runtime execution providers.
    """

    def __init__(self, model_path: str, cfg: Optional[CfgNode] = None, num_threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no such exported model (write one with tools/export_model.py)")
        self.meta = read_metadata(model_path)
        self.cfg = cfg if cfg is not None else _config_of(model_path, self.meta)
        self.adapter: ExportAdapter = adapter_for(postprocessing_model(self.cfg))
        if list(self.adapter.output_names) != list(self.meta["outputs"]):
            raise ValueError(f"{model_path}: its outputs {self.meta['outputs']} are not those of the model built from "
                             f"its config {list(self.adapter.output_names)}: export it again with this version")
        pre = self.meta["preprocessing"]
        self.pixel_mean = torch.tensor(pre["pixel_mean"], dtype=torch.float32).view(-1, 1, 1)
        self.pixel_std = torch.tensor(pre["pixel_std"], dtype=torch.float32).view(-1, 1, 1)
        self.size_divisibility = int(pre["size_divisibility"])
        self.format = "onnx" if model_path.endswith(".onnx") else "exported_program"
        if self.format == "onnx":
            self.session = onnx_session(model_path, num_threads, providers)
            self.program = None
        else:
            self.session = None
            self.program = torch.export.load(model_path).module()

    def run(self, inputs: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The raw outputs (by name) of the exported network on graph inputs in ``input_names`` order."""
        if self.session is not None:
            feeds = {name: x.numpy() for name, x in zip(self.adapter.input_names, inputs)}
            values = [torch.from_numpy(v) for v in self.session.run(None, feeds)]
        else:
            with torch.no_grad():
                values = self.program(*inputs)
        return self.adapter.outputs_of(values)

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        images = normalized_image_batch(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)
        self.adapter.check_images(images)
        outputs = self.run(self.adapter.inputs_of(images))
        with torch.no_grad():
            return self.adapter.postprocess(outputs, batched_inputs, images)


class ONNXPredictor(Predictor):
    """:class:`maskfrozen.Predictor` (detectron2's ``DefaultPredictor``) on an exported model:
    ``predictor(bgr_image) -> {"instances": Instances}`` at the input's size, as the PyTorch
    predictor returns them. ``model_path``: ``.onnx`` (ONNX Runtime) or ``.pt2``."""

    def __init__(self, model_path: str, cfg: Optional[CfgNode] = None, num_threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.model = ExportedModel(model_path, cfg, num_threads, providers)
        self.cfg = self.model.cfg
        datasets = self.cfg.DATASETS.TEST
        self.metadata = MetadataCatalog.get(datasets[0]) if len(datasets) else None
        self.aug = T.ResizeShortestEdge([self.cfg.INPUT.MIN_SIZE_TEST] * 2, self.cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = self.cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")

    @property
    def class_names(self) -> List[str]:
        return list(self.model.meta.get("class_names", []))

