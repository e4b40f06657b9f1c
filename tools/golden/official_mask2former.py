"""Golden fixtures of Mask2Former from its official implementation (facebookresearch/Mask2Former
at 9b0651c): ``python tools/golden/make_fixtures.py mask2former OFFICIAL_SRC_DIR``.

The official model is built from its own code and its COCO instance-segmentation yaml
(``configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml``), shrunk through its own
config keys (a narrow ResNet-50 via ``MODEL.RESNETS.*``, fewer classes, queries, channels and
layers, fewer sampled points), random weights at a fixed seed (every tensor perturbed so that no
parameter is a constant and a wrongly mapped key shows). Shims: the package ``__init__`` files
are not run (they import datasets and timm), the compiled ``MultiScaleDeformableAttention`` is
an empty module so that the official ``MSDeformAttn`` falls back to its own
``ms_deform_attn_core_pytorch``.

Saved per case: the official-format checkpoint (``{"model": state_dict}``), the inputs (two
images of different sizes, their instances, an output size different from the input size) and
the official outputs: backbone features, pixel-decoder outputs, every decoder layer's class and
mask logits, the final ``Instances``; in training, every uniform random draw of the point
sampling (labelled by layer and by matcher / loss), the matcher indices and every loss term.
FastInst's fixtures (``official_fastinst.py``) reuse these helpers.
"""
import contextlib
import importlib
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import golden_io
import shims

__all__ = ["synthetic_batch", "perturb_state_dict", "PointRecorder", "instances_to_dict", "make"]

COMMIT = "9b0651c"
SEED = 0
CASE = "mask2former"
OFFICIAL_YAML = "configs/coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml"
# the official config shrunk through its own keys (a narrow ResNet-50: 16/4 channels per group)
OFFICIAL_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "7", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "16", "MODEL.MASK_FORMER.DEC_LAYERS", "5",
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ", "True", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "128",
    "TEST.DETECTIONS_PER_IMAGE", "20",
]
# maskfrozen's COCO config with the same reductions (the encoder's heads under our key too)
MASKFROZEN_CONFIG = "configs/coco/mask2former/maskformer2_R50_bs16_50ep.yaml"
MASKFROZEN_OPTS = OFFICIAL_OPTS + ["MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", "4"]

# (H, W) of the two input images and the output (height, width) asked of the model for each
IMAGE_SIZES = [(96, 128), (120, 88)]
OUTPUT_SIZES = [(60, 80), (150, 110)]


# ----------------------------------------------------------------------------- shared helpers
def synthetic_batch(gen: torch.Generator, num_classes: int, image_sizes=IMAGE_SIZES,
                    output_sizes=OUTPUT_SIZES) -> List[Dict[str, Any]]:
    """Images (smooth random colours, uint8 CHW) with 2-3 ellipse / rectangle objects each:
    ``{"image", "height", "width", "gt_classes" [T], "gt_masks" [T, H, W] bool}``."""
    batch = []
    for (h, w), (out_h, out_w) in zip(image_sizes, output_sizes):
        coarse = torch.rand(3, h // 8, w // 8, generator=gen) * 255
        image = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        image = (image + 20 * torch.randn(3, h, w, generator=gen)).clamp(0, 255).to(torch.uint8)
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        masks = []
        for k in range(2 + len(batch)):
            cy, cx = (torch.rand(2, generator=gen) * torch.tensor([h * 0.6, w * 0.6]) + torch.tensor([h * 0.2, w * 0.2]))
            ry, rx = torch.rand(2, generator=gen) * torch.tensor([h * 0.25, w * 0.25]) + 6
            if k % 2 == 0:
                masks.append(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1)
            else:
                masks.append(((ys - cy).abs() <= ry) & ((xs - cx).abs() <= rx))
        classes = torch.randint(0, num_classes, (len(masks),), generator=gen)
        batch.append({"image": image, "height": out_h, "width": out_w, "gt_classes": classes,
                      "gt_masks": torch.stack(masks)})
    return batch


def detectron2_inputs(batch: Sequence[Dict[str, Any]], with_instances: bool) -> List[Dict[str, Any]]:
    """Detectron2's batched inputs (``instances`` with ``gt_classes`` / ``gt_masks`` tensor, as the
    official instance mappers give) from :func:`synthetic_batch` items."""
    from detectron2.structures import Instances

    out = []
    for x in batch:
        item = {"image": x["image"], "height": x["height"], "width": x["width"]}
        if with_instances:
            inst = Instances(tuple(x["image"].shape[-2:]))
            inst.gt_classes = x["gt_classes"].clone()
            inst.gt_masks = x["gt_masks"].clone()
            item["instances"] = inst
        out.append(item)
    return out


def perturb_state_dict(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Add N(0, 0.05) noise to every floating tensor of the model (parameters and buffers such
    as FrozenBN statistics; variances kept positive; not the criterion's class weights), so
    that no tensor is a constant (zero biases, unit norms) and a wrongly mapped key changes the
    outputs."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or "criterion." in name:
                continue
            noise = 0.05 * torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_((t + noise).abs() + 0.5)
            else:
                t.add_(noise)


class PointRecorder:
    """Records every ``torch.rand`` draw made while active, labelled by the layer being matched
    or supervised (``set_label``), e.g. ``{"aux0.match": [image 0, image 1], "aux0.loss":
    [candidates, fresh points]}``; labels are resolved after the run from the tensor identity of
    each layer's ``pred_logits``."""

    def __init__(self):
        self.calls: List[Tuple[Tuple[str, int], torch.Tensor]] = []
        self.label: Tuple[str, int] = ("none", 0)
        self._rand = torch.rand

    @contextlib.contextmanager
    def active(self):
        def recording_rand(*args, **kwargs):
            value = self._rand(*args, **kwargs)
            self.calls.append((self.label, value.detach().clone()))
            return value

        torch.rand = recording_rand
        try:
            yield self
        finally:
            torch.rand = self._rand

    def wrap(self, kind: str, fn: Callable, record: Dict[str, List] = None) -> Callable:
        """``fn(outputs, targets, ...)`` that labels the draws it makes with ``(kind,
        id(outputs["pred_logits"]))``; its result is appended to ``record[label]`` if given."""
        def wrapped(outputs, *args, **kwargs):
            previous = self.label
            self.label = (kind, id(outputs["pred_logits"]))
            try:
                result = fn(outputs, *args, **kwargs)
            finally:
                label, self.label = self.label, previous
            if record is not None:
                record.setdefault(label, []).append(result)
            return result
        return wrapped

    def by_layer(self, names: Dict[int, str]) -> Dict[str, List[torch.Tensor]]:
        """``{"<layer>.<kind>": [draws in call order]}`` with ``names`` from tensor ids to layers."""
        out: Dict[str, List[torch.Tensor]] = {}
        for (kind, key), value in self.calls:
            if kind == "none":
                raise RuntimeError("a torch.rand draw outside the matcher / the mask loss: cannot label it")
            out.setdefault(f"{names[key]}.{kind}", []).append(value)
        return out


def layer_names(outputs: Dict[str, Any]) -> Dict[int, str]:
    """tensor id of each layer's ``pred_logits`` -> "main" / "aux{i}"."""
    names = {id(outputs["pred_logits"]): "main"}
    for i, aux in enumerate(outputs.get("aux_outputs", [])):
        if aux.get("pred_logits") is not None:
            names[id(aux["pred_logits"])] = f"aux{i}"
    return names


def decoder_layers(outputs: Dict[str, Any]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{"aux0": {"pred_logits", "pred_masks"}, ..., "main": {...}} (class logits None skipped)."""
    layers = {f"aux{i}": aux for i, aux in enumerate(outputs.get("aux_outputs", []))}
    layers["main"] = outputs
    return {name: {k: layer[k] for k in ("pred_logits", "pred_masks") if layer.get(k) is not None}
            for name, layer in layers.items()}


def instances_to_dict(results: Sequence[Dict[str, Any]]) -> List[Dict[str, torch.Tensor]]:
    """Per image ``{"image_size", "scores", "pred_classes", "pred_masks_bits"}``, the boolean
    masks ``[N, H, W]`` packed 8 pixels a byte along the flattened masks (``numpy.packbits``)."""
    out = []
    for r in results:
        inst = r["instances"]
        bits = np.packbits(inst.pred_masks.bool().flatten(1).numpy(), axis=1)
        out.append({"image_size": torch.tensor(inst.image_size), "scores": inst.scores,
                    "pred_classes": inst.pred_classes, "pred_masks_bits": torch.from_numpy(bits)})
    return out


def indices_to_lists(record: Dict[Tuple[str, int], List], names: Dict[int, str]) -> Dict[str, List]:
    """Matcher results by layer: ``{"<layer>": [[query idx, target idx] per image], ...}``
    (a layer matched twice gets ``<layer>#1`` for its second assignment)."""
    out: Dict[str, List] = {}
    for (_, key), calls in record.items():
        for n, indices in enumerate(calls):
            name = names[key] + (f"#{n}" if n else "")
            out[name] = [[torch.as_tensor(i), torch.as_tensor(j)] for i, j in indices]
    return out


def official_cfg(official_dir: str, add_config: Callable, yaml: str, opts: Sequence[str]):
    """The official config: detectron2 defaults + DeepLab keys + the project's keys, its yaml,
    the reductions; CPU, no weights."""
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_config(cfg)
    cfg.merge_from_file(os.path.join(official_dir, yaml))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


@contextlib.contextmanager
def captured_forward(module: torch.nn.Module, store: Dict[str, Any], key: str):
    """``store[key]`` = the output of ``module``'s forward inside the block (last call)."""
    handle = module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- Mask2Former
def _import_official(official_dir: str):
    shims.stub_modules(["MultiScaleDeformableAttention"])
    root = os.path.join(official_dir, "mask2former")
    shims.package_without_init("mask2former", root)
    shims.package_without_init("mask2former.modeling", os.path.join(root, "modeling"))
    for name in ("modeling.pixel_decoder.msdeformattn", "modeling.transformer_decoder",
                 "modeling.meta_arch.mask_former_head", "maskformer_model"):
        importlib.import_module(f"mask2former.{name}")
    return importlib.import_module("mask2former.config").add_maskformer2_config


def _inference(model, batch) -> Dict[str, Any]:
    store: Dict[str, Any] = {}
    decoder = model.sem_seg_head.pixel_decoder
    original = decoder.forward_features

    def forward_features(features):
        out = original(features)
        store["pixel_decoder"] = {"mask_features": out[0], "multi_scale_features": list(out[2])}
        return out

    decoder.forward_features = forward_features
    try:
        with captured_forward(model.backbone, store, "backbone"), \
                captured_forward(model.sem_seg_head.predictor, store, "decoder"), torch.no_grad():
            results = model.eval()(detectron2_inputs(batch, with_instances=False))
    finally:
        del decoder.forward_features
    return {"backbone": store["backbone"], "pixel_decoder": store["pixel_decoder"],
            "decoder": decoder_layers(store["decoder"]), "instances": instances_to_dict(results)}


def _training(model, batch) -> Dict[str, Any]:
    recorder, indices, store = PointRecorder(), {}, {}
    criterion = model.criterion
    criterion.matcher.memory_efficient_forward = recorder.wrap("match", criterion.matcher.memory_efficient_forward,
                                                               indices)
    criterion.loss_masks = recorder.wrap("loss", criterion.loss_masks)
    with captured_forward(model.sem_seg_head.predictor, store, "decoder"), recorder.active(), torch.no_grad():
        losses = model.train()(detectron2_inputs(batch, with_instances=True))
    names = layer_names(store["decoder"])
    return {"points": recorder.by_layer(names), "indices": indices_to_lists(indices, names), "losses": losses}


def make(official_dir: str, out_dir: str) -> None:
    add_config = _import_official(official_dir)
    cfg = official_cfg(official_dir, add_config, OFFICIAL_YAML, OFFICIAL_OPTS)
    shims.seed_everything(SEED)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(SEED)
    perturb_state_dict(model, gen)
    batch = synthetic_batch(gen, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    outputs = {"inference": _inference(model, batch)}
    torch.manual_seed(SEED + 1)
    outputs["training"] = _training(model, batch)
    meta = {
        "repo": "facebookresearch/Mask2Former", "commit": COMMIT, "official_config": OFFICIAL_YAML,
        "official_overrides": OFFICIAL_OPTS, "seed": SEED,
        "shims": ["package __init__ files not run (datasets, timm)",
                  "MultiScaleDeformableAttention: empty module, MSDeformAttn falls back to its ms_deform_attn_core_pytorch",
                  "every state_dict tensor but criterion.empty_weight + N(0, 0.05) (FrozenBN variances kept positive)"],
        "maskfrozen_config": MASKFROZEN_CONFIG, "maskfrozen_overrides": MASKFROZEN_OPTS,
        "image_sizes": IMAGE_SIZES, "output_sizes": OUTPUT_SIZES,
    }
    golden_io.save_case(out_dir, CASE, model.state_dict(), {"batch": batch}, outputs, meta)
