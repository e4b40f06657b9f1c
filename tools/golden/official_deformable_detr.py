"""Golden fixtures of Deformable-DETR (two-stage + iterative box refinement) from its official
implementation (fundamentalvision/Deformable-DETR at 11169a6):
``python tools/golden/make_fixtures.py deformable_detr OFFICIAL_SRC_DIR``.

The official model is built by its own ``build(args)`` from ``main.py``'s argument parser with
``--with_box_refine --two_stage`` and reduced sizes through its own arguments (hidden dim 32,
3 encoder / 3 decoder layers, FFN 64, 30 queries, dropout 0 so that a training step is
deterministic; 91 classes as in the repository). Random weights at a fixed seed, every tensor
perturbed (``official_mask2former.perturb_state_dict``) so that no parameter is a constant.

Shims (the official code is otherwise run as it is, in float64):

- the compiled ``MultiScaleDeformableAttention`` is an empty module and ``MSDeformAttn`` calls
  the repository's own ``ms_deform_attn_core_pytorch`` instead of ``MSDeformAttnFunction``;
- ``torchvision.__version__`` reads "0.9.0" while the official code runs (its ``util/misc.py``
  takes the version's first three characters as a float: "0.2" of 0.2x would select the
  torchvision < 0.5 branch);
- the torchvision ResNet-50 is replaced by a parameter-free stand-in whose ``layer2..layer4``
  return fixed random features (channels 16/32/64 at strides 8/16/32, of the sizes a ResNet
  gives on the padded batch), wrapped by the official ``BackboneBase`` (padding masks by its
  nearest interpolation) and ``Joiner`` (its sine position embedding): the golden comparison
  starts from backbone features; the ResNet-50 conversion is tested on its own
  (tests/test_detr_backbone_conversion.py);
- the hard-coded width of the two-stage proposal embedding (``num_pos_feats = 128``, i.e.
  hidden dim 256) reads hidden_dim / 2: the official source of ``get_proposal_pos_embed`` with
  that one constant substituted.

Saved: the official checkpoint (``{"model": state_dict}``, no backbone tensors: the stand-in has
none), the inputs (features, image sizes, output sizes, training targets with COCO category
ids) and the official outputs: per-level padding masks and position embeddings, input
projections, encoder memory, two-stage scores / boxes / top-k indices, every decoder layer's
logits and boxes, the post-processed detections at the output size; in training, every matcher
call's indices and every loss term. H-DETR's and DINO's fixture scripts reuse these helpers.
"""
import contextlib
import inspect
import sys
import textwrap
import types
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

import golden_io
import shims
from official_mask2former import perturb_state_dict

__all__ = ["IMAGE_SIZES", "OUTPUT_SIZES", "BACKBONE_CHANNELS", "official_runtime", "substitute_constant",
           "FixedFeatureBackbone", "random_features", "coco_targets", "Recorder", "flat_levels", "make"]

REPO = "fundamentalvision/Deformable-DETR"
COMMIT = "11169a6"
SEED = 0
CASE = "deformable_detr"
# (H, W) of the two images (the batch pads to 181 x 203, as the official nested tensor does) and
# the output size asked for each (COCO evaluation: the original image size)
IMAGE_SIZES = [(150, 203), (181, 128)]
OUTPUT_SIZES = [(225, 304), (290, 205)]
BACKBONE_CHANNELS = (16, 32, 64)  # the stand-in's layer2..layer4 (res3..res5)
BACKBONE_STRIDES = (8, 16, 32)
# official main.py arguments: the two-stage + box refine recipe, reduced
OFFICIAL_ARGS = ["--with_box_refine", "--two_stage", "--hidden_dim", "32", "--nheads", "8", "--enc_layers", "3",
                 "--dec_layers", "3", "--dim_feedforward", "64", "--num_queries", "30", "--dropout", "0.0",
                 "--device", "cpu"]
# maskfrozen: the COCO config with the same reductions (the test's feature backbone replaces the ResNet)
MASKFROZEN_CONFIG = "configs/coco/deformable_detr/deformable_detr_R50_two_stage_50ep.yaml"
MASKFROZEN_OPTS = ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "8", "MODEL.DETR.ENC_LAYERS", "3",
                   "MODEL.DETR.DEC_LAYERS", "3", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "30",
                   "MODEL.DETR.DROPOUT", "0.0"]
# GT of the training step: (COCO category id, (x0, y0, x1, y1) in input pixels) per image
TARGETS = [
    [(1, (10.0, 20.0, 90.0, 140.0)), (18, (120.0, 5.0, 200.0, 60.0)), (44, (60.0, 70.0, 150.0, 149.0))],
    [(90, (5.0, 100.0, 60.0, 180.0)), (3, (30.0, 10.0, 127.0, 95.0))],
]
OFFICIAL_MODULES = ("models", "util", "datasets", "engine", "main", "MultiScaleDeformableAttention")


# ----------------------------------------------------------------------------- shims
@contextlib.contextmanager
def official_runtime(official_dir: str, msdeform_modules: Sequence[str], cuda_to_cpu: bool = False,
                     empty_modules: Dict[str, Dict[str, Any]] = None):
    """The official repository importable (its top-level packages dropped before and after),
    with the compiled deformable attention replaced by the repository's own pure-PyTorch core in
    each module of ``msdeform_modules``, ``torchvision.__version__`` = "0.9.0", and, with
    ``cuda_to_cpu``, ``Tensor.cuda()`` / ``Tensor.to("cuda")`` kept on the CPU (DINO's
    denoising and criterion hard-code them). ``empty_modules`` ({name: attributes}) stand in for
    official modules the runs never use but whose imports are missing (e.g. a Swin backbone)."""
    import importlib

    import torchvision

    version, tensor_cuda, tensor_to = torchvision.__version__, torch.Tensor.cuda, torch.Tensor.to
    with shims.official_on_path(official_dir, drop_modules=OFFICIAL_MODULES):
        shims.stub_modules(["MultiScaleDeformableAttention"])
        for name, attributes in (empty_modules or {}).items():
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attributes)
        torchvision.__version__ = "0.9.0"
        if cuda_to_cpu:
            torch.Tensor.cuda = lambda self, *args, **kwargs: self
            torch.Tensor.to = _to_without_cuda(tensor_to)
        try:
            for name in msdeform_modules:
                module = importlib.import_module(name)
                core = importlib.import_module(name.replace(".modules.ms_deform_attn", ".functions.ms_deform_attn_func"))
                module.MSDeformAttnFunction = _pytorch_deform_function(core.ms_deform_attn_core_pytorch)
            yield
        finally:
            torchvision.__version__ = version
            torch.Tensor.cuda, torch.Tensor.to = tensor_cuda, tensor_to


def _to_without_cuda(tensor_to: Callable) -> Callable:
    def to(self, *args, **kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return tensor_to(self, *args, **kwargs)
    return to


def _pytorch_deform_function(core: Callable):
    """A stand-in for the compiled ``MSDeformAttnFunction``: ``apply`` calls ``core``."""
    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        return core(value, shapes, sampling_locations, attention_weights)
    return types.SimpleNamespace(apply=apply)


def substitute_constant(owner: Any, name: str, old: str, new: str, count: int, also_in: Sequence[Any] = ()) -> None:
    """Recompile the official function ``owner.name`` from its own source with ``old`` replaced by
    ``new`` (exactly ``count`` occurrences), in its module's namespace, and install it on
    ``owner`` and on every module of ``also_in`` that imported it by name: the hard-coded widths
    of the sine embeddings (``128`` = hidden dim 256 / 2) become the reduced model's."""
    function = inspect.getattr_static(owner, name)
    function = function.__func__ if isinstance(function, staticmethod) else function
    source = textwrap.dedent(inspect.getsource(function))
    if source.count(old) != count:
        raise RuntimeError(f"{name}: expected {count} x {old!r} in the official source, found {source.count(old)}")
    namespace: Dict[str, Any] = {}
    module = sys.modules[function.__module__]
    exec(compile(source.replace(old, new), inspect.getsourcefile(function), "exec"), module.__dict__, namespace)
    static = isinstance(owner, type) and isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(namespace[name]) if static else namespace[name])
    for other in also_in:
        setattr(other, name, namespace[name])


class _Fixed(nn.Module):
    """A stand-in ResNet stage: ignores its input, returns the feature set on the backbone."""

    def __init__(self, backbone: "FixedFeatureBackbone", index: int):
        super().__init__()
        self.index = index
        self.__dict__["owner"] = backbone  # not a submodule: no cycle in the module tree

    def forward(self, x):
        return self.owner.features[self.index]


class FixedFeatureBackbone(nn.Module):
    """Parameter-free stand-in for the official torchvision ResNet-50 ``body``: children
    ``layer2``, ``layer3``, ``layer4`` (what ``IntermediateLayerGetter`` returns) give
    ``features`` (set before each forward)."""

    def __init__(self):
        super().__init__()
        self.features: List[torch.Tensor] = []
        self.layer2, self.layer3, self.layer4 = _Fixed(self, 0), _Fixed(self, 1), _Fixed(self, 2)


def feature_backbone_builder(backbone_module, stand_in: FixedFeatureBackbone) -> Callable:
    """``build_backbone(args)`` of the official ``models/backbone.py`` (or DINO's) with the ResNet
    replaced by ``stand_in``: the official ``BackboneBase`` (masks) + ``Joiner`` (positions)."""
    def build_backbone(args):
        position = backbone_module.build_position_encoding(args)
        if "return_interm_indices" in inspect.signature(backbone_module.BackboneBase).parameters:  # DINO's
            base = backbone_module.BackboneBase(stand_in, True, list(BACKBONE_CHANNELS), [1, 2, 3])
        else:
            base = backbone_module.BackboneBase(stand_in, True, True)
        base.strides, base.num_channels = list(BACKBONE_STRIDES), list(BACKBONE_CHANNELS)
        joiner = backbone_module.Joiner(base, position)
        joiner.strides, joiner.num_channels = list(BACKBONE_STRIDES), list(BACKBONE_CHANNELS)
        return joiner
    return build_backbone


# ----------------------------------------------------------------------------- inputs
def level_sizes(padded: Tuple[int, int], num_levels: int = 4) -> List[Tuple[int, int]]:
    """(H, W) of each level a ResNet (+ stride-2 extra convs) gives on a ``padded`` batch: every
    stride-2 step rounds up."""
    h, w = padded
    sizes = []
    for step in range(1, 3 + num_levels):  # stem conv, max-pool, then one stride-2 stage per level
        h, w = (h + 1) // 2, (w + 1) // 2
        if step >= 3:
            sizes.append((h, w))
    return sizes


def random_features(gen: torch.Generator) -> List[torch.Tensor]:
    """Backbone features res3..res5 ``[2, C, H_l, W_l]`` of the padded batch (float32 values)."""
    padded = tuple(max(s[i] for s in IMAGE_SIZES) for i in range(2))
    sizes = level_sizes(padded, 3)
    return [torch.randn(len(IMAGE_SIZES), c, *hw, generator=gen) for c, hw in zip(BACKBONE_CHANNELS, sizes)]


def coco_targets() -> List[Dict[str, torch.Tensor]]:
    """The official training targets: COCO category ids, boxes (cx, cy, w, h) normalised by the
    unpadded image size."""
    targets = []
    for objects, (h, w) in zip(TARGETS, IMAGE_SIZES):
        xyxy = torch.tensor([box for _, box in objects], dtype=torch.float64) / torch.tensor([w, h, w, h])
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        targets.append({"labels": torch.tensor([c for c, _ in objects]), "boxes": cxcywh})
    return targets


def flat_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level ``[N, C, H, W]`` (or masks ``[N, H, W]``) -> ``[N, S, C]`` (``[N, S]``)."""
    if maps[0].dim() == 3:
        return torch.cat([m.flatten(1) for m in maps], 1)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


# ----------------------------------------------------------------------------- recording
class Recorder:
    """Forward hooks and function wraps that keep official intermediate values by name."""

    def __init__(self):
        self.values: Dict[str, Any] = {}
        self.handles: List[Any] = []

    def output_of(self, module: nn.Module, name: str, pick: Callable = lambda out: out) -> None:
        self.handles.append(module.register_forward_hook(lambda m, i, out: self.values.__setitem__(name, pick(out))))

    def inputs_of(self, module: nn.Module, name: str) -> None:
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: self.values.__setitem__(name, (args, kwargs)), with_kwargs=True))

    def calls_of(self, module: nn.Module, name: str) -> None:
        self.values[name] = []
        self.handles.append(module.register_forward_hook(lambda m, i, out: self.values[name].append(out)))

    @contextlib.contextmanager
    def topk_calls(self, name: str):
        """Every ``torch.topk`` (values, indices) made inside the block, in order."""
        self.values[name] = []
        topk = torch.topk

        def recording(*args, **kwargs):
            out = topk(*args, **kwargs)
            self.values[name].append(out)
            return out
        torch.topk = recording
        try:
            yield
        finally:
            torch.topk = topk

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def indices_tree(calls: Sequence) -> List[List[List[torch.Tensor]]]:
    """Matcher outputs -> [[query idx, target idx] per image] per call."""
    return [[[q.long(), t.long()] for q, t in call] for call in calls]


def detections_tree(results: Sequence[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
    return [{"scores": r["scores"], "labels": r["labels"], "boxes": r["boxes"]} for r in results]


# ----------------------------------------------------------------------------- the case
def build_official(official_dir: str, argv: Sequence[str], gen: torch.Generator):
    """(model, criterion, postprocessors, stand-in backbone, args) of the official Deformable-DETR
    (also H-DETR: the same file layout)."""
    import main
    import models.backbone as backbone_module
    import models.deformable_detr as detr_module
    import models.deformable_transformer as transformer_module

    args = main.get_args_parser().parse_args(list(argv))
    stand_in = FixedFeatureBackbone()
    detr_module.build_backbone = feature_backbone_builder(backbone_module, stand_in)
    substitute_constant(transformer_module.DeformableTransformer, "get_proposal_pos_embed",
                        "num_pos_feats = 128", f"num_pos_feats = {args.hidden_dim // 2}", 1)
    torch.manual_seed(SEED)
    model, criterion, postprocessors = detr_module.build(args)
    perturb_state_dict(model, gen)
    return model, criterion, postprocessors, stand_in, args


def promote_invalid_proposals(enc_norm: nn.Module, enc_head: nn.Linear, run: Callable,
                              num_select: int, row: int = 0, rank_by_max: bool = False) -> float:
    """Tilt row ``row`` of the encoder class head towards the embedding that every invalid
    (padded or border) token gets (its memory is zeroed, so they all share one), until the
    two-stage selection takes at least 2 of them in an image and at most num_select / 3 in each: random
    weights otherwise rank them low, and the official selection of invalid tokens (only their
    boxes are invalid) would go untested. Proposals rank by logit ``row`` (Deformable-DETR,
    H-DETR) or by the best logit (``rank_by_max``, DINO). ``run()`` is one forward; returns the
    tilt."""
    outputs = []
    handle = enc_norm.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
    with torch.no_grad():
        run()
    handle.remove()
    memory = outputs[-1]  # [N, S, C] after enc_output + norm
    logits = enc_head(memory)
    invalid = (memory == _shared_row(memory)).all(-1)
    direction = memory[invalid][0]
    projection = memory @ direction / direction.dot(direction)
    for tilt in torch.arange(0.005, 40.0, 0.005, dtype=memory.dtype):
        tilted = logits.clone()
        tilted[..., row] += tilt * projection
        picked = (tilted.max(-1).values if rank_by_max else tilted[..., row]).topk(num_select, dim=1).indices
        count = invalid.gather(1, picked).sum(1)
        if int(count.max()) >= 2 and bool((count <= num_select // 3).all()):
            with torch.no_grad():
                enc_head.weight[row] += tilt * direction / direction.dot(direction)
            return float(tilt)
    raise RuntimeError("no tilt of the encoder head selects a few invalid tokens")


def _shared_row(memory: torch.Tensor) -> torch.Tensor:
    """The embedding shared by the most tokens (the zeroed invalid ones)."""
    flat = memory.reshape(-1, memory.shape[-1])
    rows, counts = torch.unique(flat, dim=0, return_counts=True)
    return rows[counts.argmax()]


def state_dict_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The official checkpoint's tensors (float32, as saved by the official training)."""
    return {k: v.float() for k, v in model.state_dict().items()}


def padded_images():
    """The official input: a nested tensor of the two images (zeros; only their sizes matter)."""
    from util.misc import nested_tensor_from_tensor_list

    return nested_tensor_from_tensor_list([torch.zeros(3, h, w, dtype=torch.float64) for h, w in IMAGE_SIZES])


def run_inference(model, postprocessors, stand_in, features: List[torch.Tensor], record: Recorder,
                  transformer_inputs: Callable = lambda args: args[:3]) -> Dict[str, Any]:
    """One eval-mode forward + the official post-processing, in float64; the recorded stages
    (``transformer_inputs`` picks (srcs, masks, pos) from the transformer's arguments)."""
    model.eval()
    stand_in.features = [f.double() for f in features]
    images = padded_images()
    record.inputs_of(model.transformer, "transformer_inputs")
    record.output_of(model.transformer.encoder, "memory", lambda out: out[0] if isinstance(out, (tuple, list)) else out)
    with torch.no_grad(), record.topk_calls("topk"):
        out = model(images)
    record.remove()
    srcs, masks, pos = transformer_inputs(record.values["transformer_inputs"][0])
    target_sizes = torch.tensor(OUTPUT_SIZES, dtype=torch.float64)
    with torch.no_grad():
        detections = postprocessors["bbox"](out, target_sizes)
    layers = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}]
    return {
        "masks": [m.clone() for m in masks],
        "pos": flat_levels(pos).float(),
        "srcs": flat_levels(srcs).float(),
        "memory": record.values["memory"].float(),
        "layers": {"logits": torch.stack([l["pred_logits"] for l in layers]).float(),
                   "boxes": torch.stack([l["pred_boxes"] for l in layers]).float()},
        "detections": detections_tree(detections),
        "_out": out,
    }


def two_stage_outputs(logits: torch.Tensor, boxes: torch.Tensor, topk: Tuple[torch.Tensor, torch.Tensor],
                      score_column=0) -> Dict[str, torch.Tensor]:
    """The encoder proposals of every token the official two-stage selection ranked (class
    logits, sigmoid boxes): the score it ranked by (logit ``score_column``; None: the best
    logit), the boxes, the selected indices and the class logits of the selected tokens."""
    index = topk[1]
    scores = logits[..., score_column] if score_column is not None else logits.max(-1).values
    return {"scores": scores.float(), "boxes": boxes.float(), "index": index.long(),
            "selected_logits": torch.gather(logits, 1, index[..., None].expand(-1, -1, logits.shape[-1])).float()}


def run_training(model, criterion, stand_in, features, record: Recorder, loss_fn: Callable) -> Dict[str, Any]:
    """One train-mode forward + the official criterion on ``coco_targets()`` (float64): every
    matcher call's indices and every weighted loss term."""
    model.train()
    stand_in.features = [f.double() for f in features]
    images = padded_images()
    targets = coco_targets()
    record.calls_of(criterion.matcher, "matcher")
    out, losses = loss_fn(model, criterion, images, targets)
    record.remove()
    weights = criterion.weight_dict
    weighted = {k: (v * weights[k]).detach() for k, v in losses.items() if k in weights}
    return {"losses": weighted, "matcher": indices_tree(record.values["matcher"]), "_out": out}


def deformable_losses(model, criterion, images, targets):
    out = model(images)
    return out, criterion(out, targets)


def meta_for(repo: str, commit: str, args, case_config: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "repo": repo, "commit": commit, "seed": SEED, "official_args": vars(args),
        "dtype": "float64 (the official model and ours run in float64; intermediate tensors stored as float32)",
        "shims": [
            "compiled MultiScaleDeformableAttention -> the repository's ms_deform_attn_core_pytorch",
            "torchvision.__version__ = '0.9.0' while the official code runs (util/misc.py version parse)",
            "torchvision ResNet-50 -> parameter-free stand-in returning fixed features (channels 16/32/64), "
            "wrapped by the official BackboneBase (masks) and Joiner (positions)",
            "hard-coded sine width 128 -> hidden_dim / 2 (official source, one constant substituted)",
        ],
        "image_sizes": IMAGE_SIZES, "output_sizes": OUTPUT_SIZES, "backbone_channels": BACKBONE_CHANNELS,
        **case_config,
    }


def make(official_dir: str, out_dir: str) -> None:
    """Write the ``deformable_detr`` case."""
    gen = torch.Generator().manual_seed(SEED)
    features = random_features(gen)
    with official_runtime(official_dir, ["models.ops.modules.ms_deform_attn"]):
        model, criterion, post, stand_in, args = build_official(official_dir, OFFICIAL_ARGS, gen)
        model.double().eval()
        stand_in.features = [f.double() for f in features]
        tilt = promote_invalid_proposals(model.transformer.enc_output_norm, model.class_embed[-1],
                                         lambda: model(padded_images()), args.num_queries)
        checkpoint = state_dict_of(model)
        model.float().double()  # the weights of the checkpoint exactly
        record = Recorder()
        inference = run_inference(model, post, stand_in, features, record)
        out = inference.pop("_out")
        enc = two_stage_outputs(out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"],
                                record.values["topk"][0], score_column=0)
        training = run_training(model, criterion, stand_in, features, Recorder(), deformable_losses)
        training.pop("_out")
    inputs = {"features": features, "image_sizes": [list(s) for s in IMAGE_SIZES],
              "output_sizes": [list(s) for s in OUTPUT_SIZES], "targets": coco_targets()}
    outputs = {**inference, "two_stage": enc, "training": training}
    meta = meta_for(REPO, COMMIT, args, {"encoder_head_tilt": tilt, "maskfrozen_config": MASKFROZEN_CONFIG, "maskfrozen_opts": MASKFROZEN_OPTS})
    golden_io.save_case(out_dir, CASE, checkpoint, inputs, outputs, meta)
