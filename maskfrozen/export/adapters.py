"""Tensors in / tensors out views of each meta-architecture's inference, for ``torch.export``
and ONNX, and the way back to ``Instances`` through the model's OWN post-processing.

An :class:`ExportAdapter` wraps a built model and splits its eval-mode forward in two:

* ``forward(images[, image_sizes])`` - the network up to its raw outputs (class logits, boxes,
  mask logits, ...), what the exported graph computes. ``images [N, 3, H, W]`` float32 is the
  batch the model's own ``preprocess_image`` builds (``(x - mean) / std``, zero-padded to a
  multiple of the size divisibility); ``image_sizes [N, 2]`` int64 the unpadded (h, w), for the
  models whose network masks the padding (DETR family, Mask Frozen-DETR).
* ``postprocess(outputs, batched_inputs, images)`` - the model's own inference method on those
  outputs (top-k, mask scores, boxes from masks, resizing to the requested output size): the
  same function the PyTorch path runs, not a copy.

``forward`` followed by ``postprocess`` equals ``model(batched_inputs)`` in eval mode.
"""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Type

import torch
from detectron2.structures import ImageList
from torch import nn

__all__ = [
    "ExportAdapter",
    "DETRAdapter",
    "QuerySegAdapter",
    "SOTRAdapter",
    "MaskFrozenAdapter",
    "register_adapter",
    "adapter_for",
]

Outputs = Dict[str, torch.Tensor]

_ADAPTERS: List[Tuple[Type[nn.Module], Type["ExportAdapter"]]] = []


def register_adapter(meta_arch: Type[nn.Module]):
    """Class decorator: ``adapter_cls`` exports models that are instances of ``meta_arch``."""

    def wrap(adapter_cls: Type["ExportAdapter"]) -> Type["ExportAdapter"]:
        _ADAPTERS.append((meta_arch, adapter_cls))
        return adapter_cls

    return wrap


def adapter_for(model: nn.Module) -> "ExportAdapter":
    """The adapter of ``model``'s meta-architecture (an error naming the supported ones otherwise)."""
    for meta_arch, adapter_cls in _ADAPTERS:
        if isinstance(model, meta_arch):
            return adapter_cls(model)
    supported = sorted({m.__name__ for m, _ in _ADAPTERS})
    raise NotImplementedError(f"maskfrozen.export: no export adapter for meta-architecture {type(model).__name__}; "
                              f"supported: {supported}")


class ExportAdapter(nn.Module):
    """Base class (module doc). Subclasses set ``input_names`` and implement ``forward``,
    ``output_names``, ``postprocess`` and ``compared_outputs``."""

    input_names: Tuple[str, ...] = ("images",)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> Tuple[str, ...]:
        raise NotImplementedError

    def compared_outputs(self) -> Dict[str, str]:
        """Output name -> what it is ("logits", "boxes", "masks", "other"): the raw predictions
        an exported graph must reproduce."""
        raise NotImplementedError

    def postprocess(self, outputs: Outputs, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        raise NotImplementedError

    def postprocessing_parameters(self) -> Dict:
        """The inference settings the post-processing uses (written to the export's json)."""
        return {}

    def check_images(self, images: ImageList) -> None:
        """Raise a ValueError for a batch the exported graph cannot run although the PyTorch
        model can (none by default)."""

    # ------------------------------------------------------------------ preprocessing
    @property
    def preprocessor(self) -> nn.Module:
        """The module whose ``preprocess_image`` builds the model's input batch."""
        return self.model

    @property
    def size_divisibility(self) -> int:
        return int(self.preprocessor.size_divisibility)

    @property
    def max_stride(self) -> int:
        """Stride of the coarsest feature map (the smallest exportable image has 2 cells on it)."""
        return max(s.stride for s in self.model.backbone.output_shape().values())

    def preprocessing(self) -> Dict:
        """Pixel mean/std and size divisibility of ``preprocess_image`` (json-friendly)."""
        p = self.preprocessor
        return {"pixel_mean": p.pixel_mean.flatten().tolist(), "pixel_std": p.pixel_std.flatten().tolist(),
                "size_divisibility": self.size_divisibility}

    def preprocess(self, batched_inputs: List[Dict]) -> ImageList:
        """The model's own input batch (normalised, padded)."""
        return self.preprocessor.preprocess_image(batched_inputs)

    def inputs_of(self, images: ImageList) -> Tuple[torch.Tensor, ...]:
        """The graph inputs of a preprocessed batch, in ``input_names`` order."""
        values = {"images": images.tensor, "image_sizes": image_sizes_tensor(images)}
        return tuple(values[name] for name in self.input_names)

    def outputs_of(self, values: Sequence[torch.Tensor]) -> Outputs:
        """Name the graph outputs."""
        names = self.output_names
        if len(values) != len(names):
            raise ValueError(f"{type(self).__name__}: got {len(values)} outputs, expected {len(names)} {list(names)}")
        return dict(zip(names, values))

    def run_eager(self, batched_inputs: List[Dict]) -> Tuple[Outputs, ImageList]:
        """The raw outputs of the PyTorch model (no grad) and its preprocessed batch."""
        with torch.no_grad():
            images = self.preprocess(batched_inputs)
            return self.outputs_of(self(*self.inputs_of(images))), images


def image_sizes_tensor(images: ImageList) -> torch.Tensor:
    """``[N, 2]`` int64 unpadded (h, w) of a batch."""
    if isinstance(images.image_sizes, torch.Tensor):
        return images.image_sizes.to(torch.int64)
    return torch.tensor([list(s) for s in images.image_sizes], dtype=torch.int64).view(-1, 2)


# ----------------------------------------------------------------------------- DETR family
@dataclass
class FinalDetections:
    """What :meth:`DeformableDETRFamily.inference` reads from the transformer output: the
    last layer's one-to-one scores and boxes."""

    final_scores: torch.Tensor  # [N, Q, K] sigmoid, 0 for padded queries
    final_boxes: torch.Tensor  # [N, Q, 4] normalised (cx, cy, w, h)


def _detr_family():
    from maskfrozen.modeling.detr import DeformableDETRFamily

    return DeformableDETRFamily


class DETRAdapter(ExportAdapter):
    """Deformable-DETR, DINO, H-DETR, Co-DINO (inference = its DETR detector): backbone, neck and
    transformer -> last-layer one-to-one class logits, scores and boxes."""

    input_names = ("images", "image_sizes")

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("pred_logits", "scores", "pred_boxes")

    def compared_outputs(self) -> Dict[str, str]:
        return {"pred_logits": "logits", "scores": "other", "pred_boxes": "boxes"}

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.model.detect(ImageList(images, image_sizes)).transformer
        logits = out.pred_logits[-1][:, out.query_groups["one2one"]]
        return logits, out.final_scores, out.final_boxes

    def postprocess(self, outputs: Outputs, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        final = FinalDetections(outputs["scores"], outputs["pred_boxes"])
        return self.model.inference(final, batched_inputs, images.image_sizes)

    def postprocessing_parameters(self) -> Dict:
        return {"test_topk": self.model.test_topk}

    @property
    def max_stride(self) -> int:
        return max(self.model.level_strides)  # incl. the neck's extra levels

    def check_images(self, images: ImageList) -> None:
        check_encoder_tokens(self.model, images)


def check_encoder_tokens(detector: nn.Module, images: ImageList) -> None:
    """The exported DETR graph selects NUM_QUERIES encoder tokens as queries (two-stage): an
    image with fewer tokens (sum over levels of ceil(H/s) x ceil(W/s)) is an error here; the
    PyTorch model pads its queries then, a branch the graph traced on a larger image lacks
    (ONNX Runtime would fail in a broadcast, the .pt2 program in a shape guard)."""
    transformer = detector.transformer
    if not transformer.two_stage:
        return
    h, w = images.tensor.shape[-2:]
    tokens = sum(-(-h // s) * -(-w // s) for s in detector.level_strides)
    if tokens < transformer.num_queries:
        raise ValueError(f"exported {type(detector).__name__}: a {h}x{w} input gives {tokens} encoder tokens, fewer "
                         f"than MODEL.DETR.NUM_QUERIES={transformer.num_queries}: use larger images (the PyTorch "
                         f"model pads its queries for such images, the exported graph cannot)")


# ----------------------------------------------------------------------------- Mask2Former, FastInst
class QuerySegAdapter(ExportAdapter):
    """Mask2Former and FastInst (``QuerySegmentor``): backbone, pixel decoder and transformer
    decoder -> last-layer class logits ``[N, Q, K+1]`` and mask logits ``[N, Q, H/s, W/s]``."""

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("pred_logits", "pred_masks")

    def compared_outputs(self) -> Dict[str, str]:
        return {"pred_logits": "logits", "pred_masks": "masks"}

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        m = self.model
        outputs = m.transformer_decoder(m.pixel_decoder(m.backbone(images))).outputs
        return outputs["pred_logits"], outputs["pred_masks"]

    def postprocess(self, outputs: Outputs, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        return self.model.inference(dict(outputs), batched_inputs, images)

    def postprocessing_parameters(self) -> Dict:
        return {"test_topk": self.model.test_topk, "mask_threshold": self.model.mask_threshold}


# ----------------------------------------------------------------------------- SOTR
class SOTRAdapter(ExportAdapter):
    """SOTR: backbone (FPN), twin transformer and heads -> per level class logits
    ``[N, S_l, S_l, K]`` and kernels ``[N, S_l, S_l, D]``, and the mask feature ``[N, D, H/4, W/4]``.
    The dynamic convolution of the selected cells (data-dependent: the cells above the score
    threshold) runs in the post-processing, as in the PyTorch path."""

    @property
    def num_levels(self) -> int:
        return len(self.model.head.num_grids)

    @property
    def output_names(self) -> Tuple[str, ...]:
        n = self.num_levels
        return (*(f"pred_logits_{i}" for i in range(n)), *(f"pred_kernels_{i}" for i in range(n)), "mask_feature")

    def compared_outputs(self) -> Dict[str, str]:
        kinds = {f"pred_logits_{i}": "logits" for i in range(self.num_levels)}
        kinds.update({f"pred_kernels_{i}": "other" for i in range(self.num_levels)})
        kinds["mask_feature"] = "masks"
        return kinds

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        logits, kernels, mask_feature = self.model.predict(ImageList(images, []))
        return (*logits, *kernels, mask_feature)

    def postprocess(self, outputs: Outputs, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        n = self.num_levels
        logits = [outputs[f"pred_logits_{i}"] for i in range(n)]
        kernels = [outputs[f"pred_kernels_{i}"] for i in range(n)]
        return self.model.inference(logits, kernels, outputs["mask_feature"], batched_inputs, images)

    def postprocessing_parameters(self) -> Dict:
        return dict(vars(self.model.inference_cfg))


# ----------------------------------------------------------------------------- Mask Frozen-DETR
class MaskFrozenAdapter(ExportAdapter):
    """Mask Frozen-DETR: the frozen detector and the mask network in one graph -> the selected
    queries (index, embeddings, class logits, boxes) and their mask logits (+ predicted IoU)."""

    input_names = ("images", "image_sizes")
    _selected = ("query_index", "query_embeddings", "pred_logits", "pred_boxes_normalized", "pred_boxes")

    @property
    def preprocessor(self) -> nn.Module:
        return self.model.detector

    @property
    def max_stride(self) -> int:
        return max(self.model.detector.level_strides)

    def check_images(self, images: ImageList) -> None:
        check_encoder_tokens(self.model.detector, images)

    @property
    def has_iou(self) -> bool:
        return self.model.mask_network.scoring_head is not None

    @property
    def output_names(self) -> Tuple[str, ...]:
        return (*self._selected, "pred_masks", "pred_mask_boxes", *(("pred_mask_iou",) if self.has_iou else ()))

    def compared_outputs(self) -> Dict[str, str]:
        kinds = {name: "other" for name in self.output_names}
        kinds.update({"pred_logits": "logits", "pred_boxes": "boxes", "pred_masks": "masks"})
        return kinds

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        detected = self.model.detector.detect(ImageList(images, image_sizes))
        preds, selected = self.model.predict_masks(detected)
        values = (selected.index, selected.embeddings, selected.logits, selected.boxes_normalized, selected.boxes,
                  preds.logits, preds.boxes)
        return values + ((preds.iou,) if self.has_iou else ())

    def postprocess(self, outputs: Outputs, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        from maskfrozen.modeling.mask_frozen.mask_network import MaskPredictions
        from maskfrozen.modeling.mask_frozen.meta_arch import SelectedQueries

        selected = SelectedQueries(*(outputs[name] for name in self._selected))
        preds = MaskPredictions(outputs["pred_masks"], outputs["pred_mask_boxes"], outputs.get("pred_mask_iou"))
        return self.model.inference(preds, selected, batched_inputs, images)

    def postprocessing_parameters(self) -> Dict:
        m = self.model
        return {"test_topk": m.test_topk, "mask_threshold": m.mask_threshold, "num_queries": m.num_queries,
                "mask_region": type(m.mask_network.region).__name__}


def _register_builtin() -> None:
    from maskfrozen.modeling.mask_frozen.meta_arch import MaskFrozenDETR
    from maskfrozen.modeling.query_seg.meta_arch import QuerySegmentor
    from maskfrozen.modeling.sotr.meta_arch import SOTR

    register_adapter(_detr_family())(DETRAdapter)
    register_adapter(QuerySegmentor)(QuerySegAdapter)
    register_adapter(SOTR)(SOTRAdapter)
    register_adapter(MaskFrozenDETR)(MaskFrozenAdapter)


_register_builtin()
