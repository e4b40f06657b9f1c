"""Golden fixtures of Co-DINO (K=2: Faster R-CNN + ATSS auxiliary heads) from its official
implementation (Sense-X/Co-DETR at 2665352, mmdet 2.25.3 / mmcv 1.7.0):
``python tools/golden/make_fixtures.py co_dino OFFICIAL_RUNTIME_DIR``.

The official code needs mmcv 1.x and mmdet 2.x, which are not maskfrozen dependencies. They
run from a separate folder (never the project's venv), OFFICIAL_RUNTIME_DIR, laid out as:

- ``projects/`` and ``mmdet/models/`` of Sense-X/Co-DETR 2665352 (its vendored mmdet models);
- the rest of ``mmdet/`` from the mmdet 2.25.3 wheel (``pip download --no-deps mmdet==2.25.3``,
  unzipped; the vendored models are mmdet 2.25.3's plus Co-DETR's changes);
- ``mmcv/`` from the mmcv 1.7.0 sdist (``pip download --no-deps --no-build-isolation
  mmcv==1.7.0`` with ``MMCV_WITH_OPS=0`` from a venv whose setuptools still has pkg_resources;
  only the Python package is used) and the ``six`` / ``terminaltables`` / ``addict`` wheels;
- ``mmcv_cpu_ops/``: mmcv 1.7.0's own CPU kernels of ``nms``, ``softnms`` and ``roi_align``
  (``mmcv/ops/csrc/pytorch/{nms,roi_align}.cpp`` and ``cpu/{nms,roi_align}.cpp``) compiled
  unchanged by :func:`build_mmcv_cpu_ops` (torch's cpp_extension, about a minute) - the
  official soft-NMS, NMS and RoIAlign, not stand-ins.

Shims: ``mmcv._ext`` is a module that serves those compiled kernels and raises for any other
op (none is called: mmcv's deformable attention takes its pure-PyTorch path on CPU tensors);
``Tensor.cuda`` is the identity and ``Tensor.to("cuda")`` stays on the CPU (the official heads
move index tensors and the denoising queries to the GPU);
``yapf`` (config pretty-printing), ``fairscale`` (activation checkpointing, off here), ``timm``,
``einops`` and ``mmcv_custom`` (Swin / ViT backbones, unused) are stubs. The official model runs
in float64 (neighbouring random-weight scores are closer than float32 noise); the compiled
NMS kernels read float32, so boxes and scores are cast to float32 for them (as an official
float32 run has them).

The model: the official ``co_dino_5scale_r50_1x_coco.py`` config, reduced through its own
keys: an mmdet ResNet-18 of base width 8 (stages 8/16/32/64 channels), embed dims 32, 8 heads,
2 encoder + 2 decoder layers, FFN 64, 40 queries, 20 denoising queries, 32-channel
auxiliary heads and 32-wide RoI FCs, the RoI sampler's 512 kept; ``num_dec_layer`` = 2 in the
loss weights as the config computes them. Random weights at a fixed seed, every tensor
perturbed (``official_mask2former.perturb_state_dict``).

Saved (case ``co_dino``): the official checkpoint (``{"state_dict": ...}``, mmdet names), the
inputs (uint8 images, sizes, GT) and the official values: backbone and neck features,
encoder memory, two-stage top-k scores / boxes, every decoder layer's logits and boxes, the
adapter levels, the final detections at the output size (top-k, clipping, soft-NMS); in
training, the denoising queries, every auxiliary head's targets (ATSS and RPN per-anchor
labels, RoI sampling, the positive-query groups with their random negatives) and every loss term.
"""
import os
import sys
import types
from typing import Any, Dict, List

import torch

import golden_io
import shims

REPO = "Sense-X/Co-DETR"
COMMIT = "2665352"
SEED = 0
CASE = "co_dino"
# (H, W); the batch pads to 128 x 128 (size_divisor 1): a multiple of every stride (up to 64), where
# mmdet's nearest-interpolated padding masks equal ours (ceil(size / stride) valid cells)
IMAGE_SIZES = [(128, 128), (96, 80)]
OUTPUT_SIZES = [(160, 150), (144, 120)]  # the original image sizes (rescale=True)
EMBED = 32
NUM_CLASSES = 80
NUM_QUERY = 40
NUM_DN = 20
ENC_LAYERS, DEC_LAYERS = 2, 2
TARGETS = [  # (class index, (x0, y0, x1, y1) input pixels) per image
    [(0, (10.0, 20.0, 90.0, 110.0)), (17, (70.0, 5.0, 125.0, 60.0)), (43, (60.0, 70.0, 120.0, 125.0)),
     (5, (100.0, 100.0, 103.0, 103.0))],  # 3 x 3 px: its best RPN anchor has IoU < 0.3 (min_pos_iou)
    [(79, (5.0, 30.0, 60.0, 90.0)), (2, (30.0, 10.0, 78.0, 70.0))],
]
MASKFROZEN_CONFIG = "configs/coco/co_detr/co_dino_R50_5scale_12ep.yaml"
MASKFROZEN_OPTS = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
    "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "8", "MODEL.DETR.ENC_LAYERS", "2",
    "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "40",
    "MODEL.DETR.DN_NUMBER", "20", "MODEL.CO_DETR.ROI_HEAD.FC_DIM", "32", "MODEL.WEIGHTS", "",
    "MODEL.BACKBONE.NAME", "build_resnet_any_width_backbone",
    "MODEL.DETR.SIZE_DIVISIBILITY", "1",
]
CPU_OPS = ("nms", "softnms", "roi_align_forward", "roi_align_backward")
STUBS = ("yapf.yapflib.yapf_api", "fairscale.nn.checkpoint", "timm.models.layers", "einops", "mmcv_custom")


def build_mmcv_cpu_ops(mmcv_src: str, build_dir: str):
    """Compile mmcv's own CPU ``nms`` / ``softnms`` / ``roi_align`` kernels (the files of the
    mmcv 1.7.0 sdist at ``mmcv_src``, copied unchanged) with a binding of just those ops."""
    from torch.utils.cpp_extension import load

    csrc = os.path.join(mmcv_src, "mmcv", "ops", "csrc")
    os.makedirs(build_dir, exist_ok=True)
    sources = []
    for sub, name in (("pytorch", "nms"), ("pytorch/cpu", "nms"), ("pytorch", "roi_align"), ("pytorch/cpu", "roi_align")):
        dst = os.path.join(build_dir, f"{sub.replace('/', '_')}_{name}.cpp")
        with open(os.path.join(csrc, sub, f"{name}.cpp")) as f, open(dst, "w") as g:
            g.write(f.read())
        sources.append(dst)
    binding = os.path.join(build_dir, "binding.cpp")
    with open(binding, "w") as f:
        f.write(_BINDING)
    return load("mmcv_cpu_ops", sources + [binding], extra_include_paths=[os.path.join(csrc, "common")],
                extra_cflags=["-O2", "-DMMCV_WITH_CPU"], build_directory=build_dir)


_BINDING = """#include <torch/extension.h>
#include "pytorch_cpp_helper.hpp"
Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);
Tensor softnms(Tensor boxes, Tensor scores, Tensor dets, float iou_threshold, float sigma, float min_score,
               int method, int offset);
void roi_align_forward(Tensor input, Tensor rois, Tensor output, Tensor argmax_y, Tensor argmax_x,
                       int aligned_height, int aligned_width, float spatial_scale, int sampling_ratio,
                       int pool_mode, bool aligned);
void roi_align_backward(Tensor grad_output, Tensor rois, Tensor argmax_y, Tensor argmax_x, Tensor grad_input,
                        int aligned_height, int aligned_width, float spatial_scale, int sampling_ratio,
                        int pool_mode, bool aligned);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nms", &nms, py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"), py::arg("offset"));
  m.def("softnms", &softnms, py::arg("boxes"), py::arg("scores"), py::arg("dets"), py::arg("iou_threshold"),
        py::arg("sigma"), py::arg("min_score"), py::arg("method"), py::arg("offset"));
  m.def("roi_align_forward", &roi_align_forward, py::arg("input"), py::arg("rois"), py::arg("output"),
        py::arg("argmax_y"), py::arg("argmax_x"), py::arg("aligned_height"), py::arg("aligned_width"),
        py::arg("spatial_scale"), py::arg("sampling_ratio"), py::arg("pool_mode"), py::arg("aligned"));
  m.def("roi_align_backward", &roi_align_backward, py::arg("grad_output"), py::arg("rois"), py::arg("argmax_y"),
        py::arg("argmax_x"), py::arg("grad_input"), py::arg("aligned_height"), py::arg("aligned_width"),
        py::arg("spatial_scale"), py::arg("sampling_ratio"), py::arg("pool_mode"), py::arg("aligned"));
}
"""


class _CompiledOps(types.ModuleType):
    """``mmcv._ext``: the compiled CPU kernels; any other op raises when called."""

    def __init__(self, ops):
        super().__init__("mmcv._ext")
        self._ops = ops

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if hasattr(self._ops, name):
            return getattr(self._ops, name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: not compiled for the golden run")
        return missing


def _float32_kernels(ops):
    """The mmcv kernels read float32 data: cast float64 boxes / scores / features for them."""
    class Cast:
        def nms(self, boxes, scores, iou_threshold, offset):
            return ops.nms(boxes.float(), scores.float(), iou_threshold, offset)

        def softnms(self, boxes, scores, dets, iou_threshold, sigma, min_score, method, offset):
            dets32 = dets.float()
            keep = ops.softnms(boxes.float(), scores.float(), dets32, iou_threshold, sigma, min_score, method, offset)
            dets.copy_(dets32)
            return keep

        def roi_align_forward(self, input, rois, output, argmax_y, argmax_x, **kwargs):
            out32, y32, x32 = output.float(), argmax_y.float(), argmax_x.float()
            ops.roi_align_forward(input.float(), rois.float(), out32, y32, x32, **kwargs)
            output.copy_(out32)

        def __getattr__(self, name):
            return getattr(ops, name)
    return Cast()


def official_runtime(runtime_dir: str):
    """Put the official runtime folder (see module doc) on sys.path with the shims; returns
    the ``mmdet.models.build_detector`` and ``mmcv.Config`` of it."""
    ops_dir = os.path.join(runtime_dir, "mmcv_cpu_ops")
    mmcv_src = os.path.join(runtime_dir, "mmcv_src")
    ops = build_mmcv_cpu_ops(mmcv_src, ops_dir)
    shims.stub_modules(STUBS)
    sys.modules["yapf.yapflib.yapf_api"].FormatCode = lambda text, **kwargs: (text, None)
    sys.modules["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module, *args, **kwargs: module
    for name in ("DropPath", "Mlp", "trunc_normal_", "to_2tuple"):
        setattr(sys.modules["timm.models.layers"], name, None)
    sys.modules["einops"].rearrange = sys.modules["einops"].repeat = None
    sys.modules["mmcv_custom"].load_checkpoint = None
    sys.modules["mmcv._ext"] = _CompiledOps(_float32_kernels(ops))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):  # the heads' .to('cuda') stays on the CPU
        args = tuple("cpu" if a == "cuda" else a for a in args)
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)
    torch.Tensor.to = to_cpu
    sys.path.insert(0, runtime_dir)
    from mmcv import Config  # noqa: E402
    from mmdet.models import build_detector  # noqa: E402
    import projects.models  # noqa: F401,E402  (registers the Co-DETR modules)
    return build_detector, Config


def tiny_config(Config, runtime_dir: str):
    """The official Co-DINO R50 config, reduced through its own keys (module doc)."""
    cfg = Config.fromfile(os.path.join(runtime_dir, "projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py"))
    m = cfg.model
    m.backbone.update(depth=18, base_channels=8, init_cfg=None, frozen_stages=-1)
    m.neck.update(in_channels=[8, 16, 32, 64], out_channels=EMBED)
    lw = DEC_LAYERS * 2.0  # num_dec_layer * lambda_2 of the config
    m.rpn_head.update(in_channels=EMBED, feat_channels=EMBED)
    m.rpn_head.loss_cls.loss_weight = m.rpn_head.loss_bbox.loss_weight = lw
    qh = m.query_head
    qh.update(num_query=NUM_QUERY, in_channels=64)
    qh.dn_cfg.group_cfg.num_dn_queries = NUM_DN
    t = qh.transformer
    t.encoder.num_layers, t.encoder.with_cp = ENC_LAYERS, 0
    t.decoder.num_layers = DEC_LAYERS
    t.encoder.transformerlayers.attn_cfgs.embed_dims = EMBED
    t.encoder.transformerlayers.feedforward_channels = 64
    for attn in t.decoder.transformerlayers.attn_cfgs:
        attn.embed_dims = EMBED
    t.decoder.transformerlayers.feedforward_channels = 64
    qh.positional_encoding.num_feats = EMBED // 2
    rh = m.roi_head[0]
    rh.bbox_roi_extractor.out_channels = EMBED
    rh.bbox_head.update(in_channels=EMBED, fc_out_channels=32)
    rh.bbox_head.loss_cls.loss_weight = lw
    rh.bbox_head.loss_bbox.loss_weight = 10.0 * lw
    bh = m.bbox_head[0]
    bh.update(in_channels=EMBED, feat_channels=EMBED)
    bh.loss_cls.loss_weight, bh.loss_bbox.loss_weight, bh.loss_centerness.loss_weight = lw, 2.0 * lw, lw
    _ffn_embed_dims(cfg)
    return cfg


def _ffn_embed_dims(cfg) -> None:
    """mmcv's FFN defaults to 256 embed dims (the layers' own ``feedforward_channels`` only
    overrides the hidden width): give their ``ffn_cfgs`` the reduced width."""
    for layers in (cfg.model.query_head.transformer.encoder.transformerlayers,
                   cfg.model.query_head.transformer.decoder.transformerlayers):
        layers.ffn_cfgs = dict(type="FFN", embed_dims=EMBED, feedforward_channels=64, num_fcs=2, ffn_drop=0.0,
                               act_cfg=dict(type="ReLU", inplace=True))


MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # RGB, the official img_norm_cfg


def official_inputs():
    """uint8 RGB images (CHW), the normalised zero-padded batch and mmdet's img_metas."""
    gen = torch.Generator().manual_seed(SEED)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in IMAGE_SIZES]
    pad_h, pad_w = max(h for h, _ in IMAGE_SIZES), max(w for _, w in IMAGE_SIZES)
    batch = torch.zeros(len(images), 3, pad_h, pad_w, dtype=torch.float64)
    mean, std = torch.tensor(MEAN, dtype=torch.float64)[:, None, None], torch.tensor(STD, dtype=torch.float64)[:, None, None]
    metas = []
    for i, (image, (h, w), (oh, ow)) in enumerate(zip(images, IMAGE_SIZES, OUTPUT_SIZES)):
        batch[i, :, :h, :w] = (image.double() - mean) / std
        scale = [w / ow, h / oh, w / ow, h / oh]
        import numpy as np
        metas.append(dict(img_shape=(h, w, 3), ori_shape=(oh, ow, 3), pad_shape=(h, w, 3),
                          scale_factor=np.array(scale, dtype=np.float32), flip=False, batch_input_shape=(pad_h, pad_w)))
    return images, batch, metas


def official_targets():
    boxes = [torch.tensor([b for _, b in t], dtype=torch.float64) for t in TARGETS]
    labels = [torch.tensor([c for c, _ in t], dtype=torch.int64) for t in TARGETS]
    return boxes, labels


def build_official(official_dir: str):
    """The reduced official model, weights perturbed and rounded to float32 (the checkpoint),
    run in float64; returns (model, float32 state_dict)."""
    from official_mask2former import perturb_state_dict

    build_detector, Config = official_runtime(official_dir)
    cfg = tiny_config(Config, official_dir)
    shims.seed_everything(SEED)
    model = build_detector(cfg.model)
    model.init_weights()
    perturb_state_dict(model, torch.Generator().manual_seed(SEED + 1))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    for head in (model.rpn_head, model.bbox_head[0]):  # anchors in float64 too (grid_priors' default: float32)
        grid_priors = head.prior_generator.grid_priors
        head.prior_generator.grid_priors = lambda *args, _f=grid_priors, **kwargs: _f(
            *args, **{**kwargs, "dtype": torch.float64})
    encode = model.rpn_head.bbox_coder.encode  # mmdet's bbox2delta computes in float32: back to float64
    model.rpn_head.bbox_coder.encode = lambda *args, **kwargs: encode(*args, **kwargs).double()
    return model.double(), state, cfg


def inference_outputs(model, batch, metas) -> Dict[str, Any]:
    """Neck features, the query head's per-layer logits and boxes, the encoder's
    top-k scores / boxes, the adapter levels and the final detections (rescaled)."""
    values: Dict[str, Any] = {}
    hooks = [model.neck.register_forward_hook(lambda m, i, o: values.__setitem__("neck", list(o)))]
    forward = model.query_head.forward  # simple_test calls .forward directly (no module hooks)

    def recording_forward(*args, **kwargs):
        values["query_head"] = forward(*args, **kwargs)
        return values["query_head"]
    model.query_head.forward = recording_forward
    model.eval()
    with torch.no_grad():
        results = model.query_head.simple_test(model.extract_feat(batch, metas), metas, rescale=True)
    for h in hooks:
        h.remove()
    model.query_head.forward = forward
    logits, boxes, topk_score, topk_anchor, adapter = values["query_head"]
    single = lambda maps: [m.float() for m in maps]  # noqa: E731  (features: float32 to keep the case small)
    return {"neck": single(values["neck"]), "logits": list(logits), "boxes": list(boxes),
            "enc_topk_logits": topk_score, "enc_topk_boxes": topk_anchor, "adapter": single(adapter),
            "detections": [{"boxes": d[:, :4], "scores": d[:, 4], "labels": l} for d, l in results]}


def _wrap(obj, name: str, record):
    """Replace ``obj.name`` by a call that passes its arguments and result to ``record``."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        record(args, kwargs, result)
        return result
    setattr(obj, name, wrapped)
    return lambda: setattr(obj, name, original)


def training_outputs(model, batch, metas) -> Dict[str, Any]:
    """One training step's auxiliary-head targets and every loss term: the ATSS per-anchor
    labels (background = 80) and anchors of every image, the RPN's valid-anchor flags and its
    assigned GT per valid anchor (0 = negative, -1 = ignored, i + 1 = GT i), the positive-query
    groups built from each head (boxes, labels, box weights) and the loss dict."""
    values: Dict[str, Any] = {"rpn_assigned": [], "groups": []}

    def atss_targets(args, kwargs, result):
        values["atss_anchors"] = [a.float() for a in result[-3]]
        values["atss_labels"] = [labels.to(torch.int8) for labels in result[-2]]  # background = 80

    def rpn_anchors(args, kwargs, result):
        values["rpn_valid"] = [torch.cat(flags) for flags in result[1]]

    def rpn_assign(args, kwargs, result):
        values["rpn_assigned"].append(result.gt_inds.to(torch.int8))

    def groups(args, kwargs, result):
        coords, labels, targets, label_weights, bbox_weights = result[:5]
        values["groups"].append({"boxes": coords, "labels": labels, "targets": targets,
                                 "label_weights": label_weights, "bbox_weights": bbox_weights[..., 0]})
    restore = [_wrap(model.bbox_head[0], "get_targets", atss_targets),
               _wrap(model.rpn_head, "get_anchors", rpn_anchors),
               _wrap(model.rpn_head.assigner, "assign", rpn_assign),
               _wrap(model.query_head, "get_aux_targets", groups)]
    gt_boxes, gt_labels = official_targets()
    model.train()
    shims.seed_everything(SEED)
    torch.set_default_dtype(torch.float64)  # the denoising generator allocates with the default dtype
    try:
        losses = model.forward_train(batch, metas, gt_boxes, gt_labels)
    finally:
        torch.set_default_dtype(torch.float32)
    for undo in restore:
        undo()
    values["losses"] = {k: (torch.stack(v) if isinstance(v, (list, tuple)) else v) for k, v in losses.items()}
    return values


def make(official_dir: str, out_dir: str) -> None:
    model, state, cfg = build_official(official_dir)
    images, batch, metas = official_inputs()
    for meta in metas:
        meta["batch_input_shape"] = tuple(batch.shape[-2:])
    outputs = {"inference": inference_outputs(model, batch, metas), "training": training_outputs(model, batch, metas)}
    inputs = {"images": images, "image_sizes": [list(s) for s in IMAGE_SIZES],
              "output_sizes": [list(s) for s in OUTPUT_SIZES],
              "targets": [{"labels": torch.tensor([c for c, _ in t]), "boxes": torch.tensor([b for _, b in t])}
                          for t in TARGETS]}
    meta = {"repo": REPO, "commit": COMMIT, "seed": SEED, "dtype": "float64 (checkpoint float32)",
            "official_config": "projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py, reduced: " + str(
                {"backbone": "ResNet depth 18 base_channels 8", "embed_dims": EMBED, "enc_layers": ENC_LAYERS,
                 "dec_layers": DEC_LAYERS, "ffn": 64, "num_query": NUM_QUERY, "num_dn_queries": NUM_DN,
                 "aux head width": EMBED, "rcnn fc": 32}),
            "runtime": "mmdet 2.25.3 + Co-DETR's vendored mmdet/models, mmcv 1.7.0 (python), mmcv CPU kernels "
                       "nms/softnms/roi_align compiled unchanged",
            "shims": ["mmcv._ext = compiled CPU nms/softnms/roi_align (float32 data), other ops raise",
                      "Tensor.cuda = identity, Tensor.to('cuda') -> cpu", "stubs: " + ", ".join(STUBS)],
            "maskfrozen_config": MASKFROZEN_CONFIG, "maskfrozen_opts": MASKFROZEN_OPTS}
    golden_io.save_case(out_dir, CASE, state, inputs, outputs, meta,
                        checkpoint_wrapper="state_dict")
