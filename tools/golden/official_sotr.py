"""Golden fixtures of SOTR from its official implementation (easton-cau/SOTR at 341ef54,
AdelaiDet based): ``python tools/golden/make_fixtures.py sotr OFFICIAL_SRC_DIR``.

The official model is built from its own code and ``configs/SOTR/R50.yaml``, shrunk through
its own config keys (a narrow ResNet-50 via ``MODEL.RESNETS.*``, FPN and mask channels 32,
small grids and scale ranges for ~100 px images, 3 classes, ``PIXEL_STD`` of the torchvision
ResNets so that random FrozenBN layers keep the features near unit scale). Random weights at a fixed seed,
every tensor perturbed (``official_mask2former.perturb_state_dict``), the ReZero gates of the
twin transformer set to U(0.3, 0.7) (they start at 0: the transformer would be the identity)
and the class bias to about -1 (the prior -4.6 leaves no cell above the 0.1 score threshold).

Shims (none of the official code is edited):

- ``TwinTransformerHead`` hard-codes ``TwinTransformer(dim=256)`` (depth 12, 8 heads): the
  ``TwinTransformer`` name in ``adet.modeling.sotr.sotr`` is replaced by the official class
  built with ``dim`` = the FPN channels (32), depth 2, 4 heads;
- ``adet.config`` edits detectron2's global config defaults on import and ``adet.modeling``
  registers ``SOTR`` in detectron2's registries: both are restored after the run, so that the
  process can import maskfrozen afterwards.

Cases:

- ``sotr_infer``: the key names and shapes of the full-size official R50 model (meta.json); two
  images of different sizes in one batch (the smaller one's mask
  upsampling ratio ``ceil(h / f_h)`` is 3, not 4) with output sizes different from the input
  sizes; in float32 the FPN features, every twin transformer call (5 grids + the full-size P5),
  class logits and kernels per level, the mask feature; in float64 the same plus the Matrix NMS
  inputs / outputs and the final ``Instances``;
- ``sotr_train``: two images whose sizes are not multiples of 4, objects on several levels, two
  objects sharing grid cells, an object with an empty mask: the official targets (mask targets,
  class grids, positive cells, grid order) and both loss terms.
"""
import contextlib
import copy
import os
from typing import Any, Dict, List

import numpy as np
import torch

import golden_io
import shims
from official_mask2former import instances_to_dict, perturb_state_dict

__all__ = ["make"]

COMMIT = "341ef54"
SEED = 0
OFFICIAL_YAML = "configs/SOTR/R50.yaml"
FPN_CHANNELS, DEPTH, HEADS = 32, 2, 4
NUM_GRIDS = [10, 8, 6, 5, 4]
SCALE_RANGES = [[1, 16], [8, 32], [16, 48], [32, 80], [64, 512]]
# the official config shrunk through its own keys (a narrow ResNet-50: 4 channels per group)
OFFICIAL_OPTS = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.FPN.OUT_CHANNELS", str(FPN_CHANNELS),
    "MODEL.SOTR.NUM_CLASSES", "3", "MODEL.SOTR.NUM_GRIDS", str(NUM_GRIDS),
    "MODEL.SOTR.FPN_SCALE_RANGES", str(SCALE_RANGES),
    "MODEL.SOTR.INSTANCE_IN_CHANNELS", str(FPN_CHANNELS), "MODEL.SOTR.MASK_IN_CHANNELS", str(FPN_CHANNELS),
    "MODEL.SOTR.MASK_CHANNELS", "32", "MODEL.SOTR.NUM_MASKS", "32", "MODEL.SOTR.NUM_KERNELS", "32",
    "MODEL.SOTR.MAX_PER_IMG", "12",
]
# maskfrozen's COCO R50 config with the same reductions
MASKFROZEN_CONFIG = "configs/coco/sotr/sotr_R50.yaml"
MASKFROZEN_OPTS = [
    "MODEL.WEIGHTS", "", "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.FPN.OUT_CHANNELS", str(FPN_CHANNELS),
    "MODEL.SOTR.NUM_CLASSES", "3", "MODEL.SOTR.NUM_GRIDS", str(NUM_GRIDS), "MODEL.SOTR.FPN_SCALE_RANGES",
    str(SCALE_RANGES), "MODEL.SOTR.DIM", str(FPN_CHANNELS), "MODEL.SOTR.DEPTH", str(DEPTH),
    "MODEL.SOTR.NUM_HEADS", str(HEADS), "MODEL.SOTR.MASK_CHANNELS", "32", "MODEL.SOTR.NUM_KERNELS", "32",
    "TEST.DETECTIONS_PER_IMAGE", "12",
]
INFER_SIZES = [(100, 140), (70, 120)]  # (H, W); padded together to 128 x 160
INFER_OUTPUT_SIZES = [(150, 210), (56, 96)]
TRAIN_SIZES = [(77, 93), (62, 101)]  # not multiples of 4; padded to 96 x 128


@contextlib.contextmanager
def restored_detectron2_globals():
    """Snapshot detectron2's default config and model registries; restore them on exit (AdelaiDet
    adds keys to the defaults and registers ``SOTR`` and its backbones on import)."""
    from detectron2.config import defaults
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    saved_cfg = copy.deepcopy(defaults._C)
    saved_maps = {reg: dict(reg._obj_map) for reg in (BACKBONE_REGISTRY, META_ARCH_REGISTRY)}
    try:
        yield
    finally:
        defaults._C.clear()
        defaults._C.update(saved_cfg)
        for reg, saved in saved_maps.items():
            reg._obj_map.clear()
            reg._obj_map.update(saved)


def build_official(official_dir: str):
    """The official SOTR (its config, its code; the transformer shim of the module doc)."""
    from adet.config import get_cfg
    from adet.modeling.sotr import sotr as sotr_module
    from adet.modeling.sotr.transformer import TwinTransformer
    from detectron2.modeling import build_model

    sotr_module.TwinTransformer = lambda dim: TwinTransformer(dim=FPN_CHANNELS, depth=DEPTH, heads=HEADS)
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(official_dir, OFFICIAL_YAML))
    cfg.merge_from_list(OFFICIAL_OPTS)
    return build_model(cfg).eval(), cfg


def full_size_shapes(official_dir: str) -> Dict[str, List[int]]:
    """``{key: shape}`` of the official R50 model at its real size (``TwinTransformer(dim=256)``,
    depth 12): the test converts zeros of these shapes into our COCO R50 model."""
    from adet.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(official_dir, OFFICIAL_YAML))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return {k: list(v.shape) for k, v in build_model(cfg).state_dict().items()}


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Perturbed weights (module doc): no constant tensor, gates away from 0, some cells scoring."""
    perturb_state_dict(model, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g"):
                p.copy_(0.3 + 0.4 * torch.rand((), generator=gen))
        bias = model.cate_head.cate_pred.bias
        bias.copy_(-1.0 + 0.3 * torch.randn(bias.shape, generator=gen))


def smooth_images(gen: torch.Generator, sizes) -> List[torch.Tensor]:
    """Float CHW images with integer values 0..255 (smooth colours + noise)."""
    images = []
    for h, w in sizes:
        coarse = torch.rand(3, h // 8 + 1, w // 8 + 1, generator=gen) * 255
        image = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        images.append((image + 20 * torch.randn(3, h, w, generator=gen)).clamp(0, 255).round())
    return images


class StageRecorder:
    """Forward hooks on the backbone, the twin transformer (every call), the class/kernel head
    and the mask head; a wrapper of the module's ``matrix_nms`` (its inputs and outputs)."""

    def __init__(self, model, sotr_module):
        self.backbone, self.transformer, self.head, self.mask, self.nms = {}, [], {}, {}, []
        self.handles = [
            model.backbone.register_forward_hook(lambda m, i, o: self.backbone.update(o)),
            model.cate_head.transformer.register_forward_hook(lambda m, i, o: self.transformer.append(o)),
            model.cate_head.register_forward_hook(
                lambda m, i, o: self.head.update(cate=list(o[0]), kernel=list(o[1]))),
            model.mask_head.register_forward_hook(lambda m, i, o: self.mask.update(mask_feature=o)),
        ]
        self.sotr_module, self.original_nms = sotr_module, sotr_module.matrix_nms

        def recording_nms(labels, masks, sum_masks, scores, sigma=2.0, kernel="gaussian"):
            out = self.original_nms(labels, masks, sum_masks, scores, sigma=sigma, kernel=kernel)
            bits = torch.from_numpy(np.packbits(masks.flatten(1).numpy(), axis=1))
            self.nms.append({"labels": labels, "masks_bits": bits, "scores": scores, "decayed": out})
            return out

        sotr_module.matrix_nms = recording_nms

    def close(self) -> Dict[str, Any]:
        for h in self.handles:
            h.remove()
        self.sotr_module.matrix_nms = self.original_nms
        calls = self.transformer  # the official head runs the full-size P5 right after level 3's grid
        transformer = {"grids": calls[:4] + calls[5:], "p5": calls[4]}
        return {"features": self.backbone, "transformer": transformer, **self.head, **self.mask,
                "matrix_nms": [{k: v.clone() for k, v in call.items()} for call in self.nms]}


def run_inference(model, sotr_module, images, dtype) -> Dict[str, Any]:
    inputs = [{"image": im.to(dtype), "height": h, "width": w} for im, (h, w) in zip(images, INFER_OUTPUT_SIZES)]
    recorder = StageRecorder(model, sotr_module)
    with torch.no_grad():
        results = model(inputs)
    stages = recorder.close()
    stages["instances"] = instances_to_dict(results)
    if dtype == torch.float32:  # float32 noise may flip mask pixels at the threshold: NMS in float64 only
        stages.pop("matrix_nms")
    else:  # float64: the heads and what follows them (the features are compared in float32)
        stages.pop("features")
        stages.pop("mask_feature")
    return stages


def _rect(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _ellipse(h, w, cy, cx, ry, rx):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1


def train_objects() -> List[Dict[str, torch.Tensor]]:
    """Per image: ``gt_masks [T, H, W]`` bool, ``gt_boxes [T, 4]`` (tight, XYXY; the empty mask
    has a box of its own), ``gt_classes [T]``. Image 0: objects 0 and 1 share centre cells;
    object 3's mask is empty. Image 1: object 3's cells move when its centre of mass moves by
    half a pixel (pixel indices vs pixel centres)."""
    (h0, w0), (h1, w1) = TRAIN_SIZES
    masks0 = [_rect(h0, w0, 10, 40, 12, 50), _ellipse(h0, w0, 27.0, 33.0, 14.0, 17.0), _rect(h0, w0, 66, 75, 83, 92),
              torch.zeros(h0, w0, dtype=torch.bool), _ellipse(h0, w0, 50.0, 70.0, 4.0, 5.5)]
    masks1 = [_ellipse(h1, w1, 31.0, 50.0, 27.0, 45.0), _rect(h1, w1, 3, 14, 5, 19),
              _ellipse(h1, w1, 45.0, 80.0, 9.0, 12.5), _rect(h1, w1, 42, 52, 0, 10)]
    out = []
    for masks, classes in ((masks0, [0, 1, 2, 1, 0]), (masks1, [2, 0, 1, 1])):
        masks = torch.stack(masks)
        boxes = []
        for m in masks:
            ys, xs = m.nonzero(as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [5, 5, 20, 20])
        out.append({"gt_masks": masks, "gt_boxes": torch.tensor(boxes, dtype=torch.float32),
                    "gt_classes": torch.tensor(classes)})
    return out


def run_training(model, images, objects) -> Dict[str, Any]:
    from detectron2.structures import BitMasks, Boxes, Instances

    inputs = []
    for image, obj in zip(images, objects):
        inst = Instances(tuple(image.shape[-2:]), gt_boxes=Boxes(obj["gt_boxes"].clone()),
                         gt_classes=obj["gt_classes"].clone(), gt_masks=BitMasks(obj["gt_masks"].clone()))
        inputs.append({"image": image, "height": image.shape[1], "width": image.shape[2], "instances": inst})
    recorded = {}
    original = model.get_ground_truth

    def recording_ground_truth(gt_instances, mask_feat_size=None):
        targets = original(gt_instances, mask_feat_size)
        recorded["targets"] = copy.deepcopy(targets)
        return targets

    model.get_ground_truth = recording_ground_truth
    model.train()
    losses = model(inputs)
    model.eval()
    ins_labels, cate_labels, ind_labels, grid_orders = recorded["targets"]
    shared = [len(order) - len(set(order)) for image in grid_orders for order in image]
    if not any(shared):
        raise RuntimeError("no grid cell is shared by two objects: move the objects of image 0")
    targets = {"mask_targets": ins_labels, "cate_labels": cate_labels, "positive": ind_labels,
               "grid_order": [[torch.tensor(o, dtype=torch.long) for o in image] for image in grid_orders]}
    return {"targets": targets, "losses": {k: v.detach() for k, v in losses.items()}}


def _meta(cfg, case: str, **extra) -> Dict[str, Any]:
    return {**extra, "repo": "easton-cau/SOTR", "commit": COMMIT, "official_config": OFFICIAL_YAML,
            "official_opts": OFFICIAL_OPTS, "seed": SEED, "case": case,
            "shims": ["TwinTransformerHead's TwinTransformer(dim=256) built with dim 32, depth 2, 4 heads",
                      "detectron2 defaults and registries restored after the run"],
            "maskfrozen_config": MASKFROZEN_CONFIG, "maskfrozen_overrides": MASKFROZEN_OPTS,
            "cv2_version": __import__("cv2").__version__, "torch_version": torch.__version__}


def make(official_dir: str, out_dir: str) -> None:
    """Write the ``sotr_infer`` and ``sotr_train`` cases (module doc) under ``out_dir``."""
    torch.set_num_threads(1)
    with restored_detectron2_globals(), shims.official_on_path(official_dir, drop_modules=["adet"]):
        from adet.modeling.sotr import sotr as sotr_module

        full_shapes = full_size_shapes(official_dir)
        shims.seed_everything(SEED)
        gen = torch.Generator().manual_seed(SEED)
        model, cfg = build_official(official_dir)
        randomise(model, gen)
        state_dict = {k: v.clone() for k, v in model.state_dict().items()}

        images = smooth_images(gen, INFER_SIZES)
        outputs = {"float32": run_inference(model, sotr_module, images, torch.float32)}
        outputs["float64"] = run_inference(model.double(), sotr_module, images, torch.float64)
        model.float()
        counts = [len(r["scores"]) for r in outputs["float64"]["instances"]]
        if min(counts) == 0:
            raise RuntimeError(f"an image without detections ({counts}): change the class bias")
        inputs = {"images": images, "output_sizes": [list(s) for s in INFER_OUTPUT_SIZES]}
        golden_io.save_case(out_dir, "sotr_infer", state_dict, inputs, outputs,
                            _meta(cfg, "sotr_infer", official_R50_state_dict_shapes=full_shapes))

        train_images = smooth_images(gen, TRAIN_SIZES)
        objects = train_objects()
        outputs = run_training(model, train_images, objects)
        inputs = {"images": train_images, "objects": objects}
        golden_io.save_case(out_dir, "sotr_train", state_dict, inputs, outputs, _meta(cfg, "sotr_train"))
