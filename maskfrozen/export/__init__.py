"""Deployment: every meta-architecture exported to ONNX or a ``torch.export`` program, and run
back into the same ``Instances`` (ONNX Runtime predictor, post-processing shared with PyTorch).

    from maskfrozen.export import ONNXPredictor
    instances = ONNXPredictor("export/model.onnx")(bgr_image)["instances"]

``tools/export_model.py`` writes the model; :mod:`.adapters` cut each meta-architecture into a
tensors-in / tensors-out network and its own post-processing; :mod:`.exporter` exports;
:mod:`.predictor` runs. ONNX needs the optional extra ``pip install .[export]`` (onnx,
onnxruntime, onnxscript).
"""
from .adapters import ExportAdapter, adapter_for, register_adapter
from .exporter import FORMATS, ExportResult, export_model, export_onnx, export_program, read_metadata, sample_inputs
from .predictor import ExportedModel, ONNXPredictor, onnx_session, postprocessing_model

__all__ = [
    "ExportAdapter", "adapter_for", "register_adapter", "FORMATS", "ExportResult", "export_model", "export_onnx",
    "export_program", "read_metadata", "sample_inputs", "ExportedModel", "ONNXPredictor", "onnx_session",
    "postprocessing_model",
]
