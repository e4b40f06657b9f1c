"""``MaskFrozenDETR``: instance masks from a frozen DETR detector (arXiv 2308.03747).

The detector (any meta-arch of our DETR family, built from the same config's
``MODEL.DETR`` / backbone sections) is loaded from ``MODEL.MASK_FROZEN.DETECTOR_WEIGHTS``
(unless ``MODEL.WEIGHTS`` is a whole Mask Frozen-DETR checkpoint, e.g. the ``model_final.pth``
of a mask training: then that file, loaded strictly after the build, holds the detector too,
and ``DETECTOR_WEIGHTS`` is not read) and frozen: no parameter requires grad, it stays in
eval mode when the model is put in train mode (``MaskFrozenDETR.train`` says so), and it
runs under ``no_grad``. Only the
:class:`MaskNetwork` trains. The detector is used only through its documented interface
(``preprocess_image``, ``prepare_targets``, ``detect``, ``losses``, ``hidden_dim``,
``num_feature_levels``, ``matcher``; see :mod:`maskfrozen.modeling.detr.meta_arch`).

Per image: the top-N queries by class score of the detector's last decoder layer ->
their embeddings, boxes and classes -> mask network -> masks (and predicted mask IoU).
Inference: the top-k (``TEST.DETECTIONS_PER_IMAGE``) (query, class) pairs among the N
selected queries, as the detector's own inference (a query may be reported with a second
class), scored ``class score x predicted IoU`` with the mask scoring head, otherwise
``class score x mean mask probability inside the mask``.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.file_io import PathManager
from torch import nn

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy
from maskfrozen.modeling.criterion import QuerySet, SetCriterion
from maskfrozen.modeling.gt_masks import padded_gt_masks
from maskfrozen.modeling.postprocess import (instances_to_output_size, mask_prob_score, top_queries,
                                             top_query_class_pairs)

from .box_encoder import build_box_encoder
from .criterion import build_mask_frozen_criterion
from .image_encoder import build_image_encoder
from .mask_network import C1Neck, MaskNetwork, MaskPredictions, build_mask_embed
from .mask_region import build_mask_region
from .mask_scoring import MaskIoUHead
from .query_encoder import QueryFeatureEncoder

__all__ = ["MaskFrozenDETR", "SelectedQueries", "build_frozen_detector", "load_detector_weights", "freeze_detector"]

logger = logging.getLogger(__name__)


@dataclass
class SelectedQueries:
    """The top-N detector queries of each image (all ``[B, N, ...]``)."""

    index: torch.Tensor  # query index among the one-to-one queries
    embeddings: torch.Tensor  # [B, N, C] last decoder layer
    logits: torch.Tensor  # [B, N, K] class logits
    boxes_normalized: torch.Tensor  # [B, N, 4] (cx, cy, w, h) / unpadded image size
    boxes: torch.Tensor  # [B, N, 4] XYXY input pixels, clipped to the image


# ----------------------------------------------------------------------------- detector
def read_detector_state(path: str) -> Dict[str, torch.Tensor]:
    """The ``model`` state dict of a detector (or whole MaskFrozenDETR) checkpoint, with
    errors naming the file and the key for a missing, unreadable or malformed file."""
    key = "MODEL.MASK_FROZEN.DETECTOR_WEIGHTS"
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{key}={path!r}: no such file; train the detector first (tools/train_net.py with its "
                                f"DETR config) or point to its model_final.pth (to deploy a trained Mask Frozen-DETR, "
                                f"MODEL.WEIGHTS = the model_final.pth of its mask training is enough)")
    try:
        checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt zip, a pickle with code, not a checkpoint at all
        raise ValueError(f"{key}={path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{key}={path!r}: expected a checkpoint whose 'model' key holds a state dict of tensors "
                         f"(as tools/train_net.py writes), found {found}")
    if any(k.startswith("detector.") for k in state):
        state = {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
    return state


def load_detector_weights(detector: nn.Module, path: str) -> None:
    """Load a detector checkpoint strictly: a missing file, missing/unexpected keys or
    shape mismatches raise an error naming them. Accepts a detector checkpoint or a
    whole MaskFrozenDETR checkpoint (its ``detector.`` entries)."""
    state = read_detector_state(path)
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"MODEL.MASK_FROZEN.DETECTOR_WEIGHTS={path!r} does not match the detector built from this config: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:3]}. The MODEL.DETR / backbone settings must equal "
            f"those the detector was trained with (inherit its yaml via _BASE_).")
    detector.load_state_dict(state, strict=True)


def freeze_detector(detector: nn.Module) -> None:
    """No parameter requires grad and the module is in eval mode (``MaskFrozenDETR.train``
    keeps it there)."""
    for p in detector.parameters():
        p.requires_grad_(False)
    detector.eval()


def is_whole_model_checkpoint(path: str) -> bool:
    """Whether ``path`` (``MODEL.WEIGHTS``) is a local checkpoint of a whole MaskFrozenDETR: its
    ``model`` holds ``detector.*`` and ``mask_network.*`` tensors. Reads only the keys (memory-
    mapped); a URL, a missing or unreadable file is False (the checkpointer reports it later)."""
    if not path or not os.path.isfile(path):
        return False
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (.pkl, damaged): not ours
        return False
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return False
    return any(k.startswith("detector.") for k in state) and any(k.startswith("mask_network.") for k in state)


def _load_or_explain_detector(cfg: CfgNode, detector: nn.Module) -> None:
    """Load the detector's weights, or say where they come from (see ``build_frozen_detector``)."""
    m = cfg.MODEL.MASK_FROZEN
    if is_whole_model_checkpoint(cfg.MODEL.WEIGHTS):
        logger.info(f"MaskFrozenDETR: MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} is a whole Mask Frozen-DETR checkpoint: "
                    f"the detector is loaded from it with the mask network; DETECTOR_WEIGHTS is not read")
    elif m.DETECTOR_WEIGHTS:
        load_detector_weights(detector, m.DETECTOR_WEIGHTS)
    elif m.ALLOW_RANDOM_DETECTOR:
        logger.warning("MaskFrozenDETR: MODEL.MASK_FROZEN.DETECTOR_WEIGHTS is empty and MODEL.WEIGHTS is not a whole "
                       "Mask Frozen-DETR checkpoint: using a RANDOM detector (ALLOW_RANDOM_DETECTOR: True, meant "
                       "for tests)")
    else:
        raise ValueError("MODEL.MASK_FROZEN.DETECTOR_WEIGHTS is empty: Mask Frozen-DETR needs the checkpoint of a "
                         "trained detector (or MODEL.WEIGHTS = a whole Mask Frozen-DETR checkpoint, e.g. the "
                         "model_final.pth of a mask training; ALLOW_RANDOM_DETECTOR: True only for tests)")


def build_frozen_detector(cfg: CfgNode) -> nn.Module:
    """The detector of ``MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE`` built from this
    config, loaded from ``DETECTOR_WEIGHTS`` and frozen. When ``MODEL.WEIGHTS`` is a whole
    Mask Frozen-DETR checkpoint (``is_whole_model_checkpoint``) ``DETECTOR_WEIGHTS`` is not
    read: the checkpointer loads that file, detector included, strictly after the build."""
    m = cfg.MODEL.MASK_FROZEN
    name = m.DETECTOR_META_ARCHITECTURE
    if name == "MaskFrozenDETR" or name not in META_ARCH_REGISTRY:
        raise ValueError(f"MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE={name!r} is not a registered detector "
                         f"meta-architecture (e.g. 'DeformableDETRFamily')")
    det_cfg = cfg.clone()
    det_cfg.defrost()
    det_cfg.MODEL.META_ARCHITECTURE = name
    detector = META_ARCH_REGISTRY.get(name)(det_cfg)
    detector.to(torch.device(cfg.MODEL.DEVICE))
    _load_or_explain_detector(cfg, detector)
    freeze_detector(detector)
    return detector


def build_mask_network(cfg: CfgNode, detector: nn.Module, c1_channels: int, c1_stride: int) -> MaskNetwork:
    """The :class:`MaskNetwork` of ``MODEL.MASK_FROZEN`` for ``detector`` (its width and
    number of feature levels)."""
    m, d = cfg.MODEL.MASK_FROZEN, detector.hidden_dim
    qe, ms = m.QUERY_ENCODER, m.MASK_SCORING
    region = build_mask_region(cfg, c1_stride)
    box_encoder = build_box_encoder(cfg, d)
    roi_dim = box_encoder.out_channels
    return MaskNetwork(
        region=region,
        neck=C1Neck(m.NECK, c1_channels, d, m.NECK_GN_GROUPS),
        image_encoder=build_image_encoder(cfg, d, detector.num_feature_levels),
        box_encoder=box_encoder,
        query_encoder=QueryFeatureEncoder(qe.NAME, d, roi_dim, m.ROI_SIZE, qe.DEPTH, qe.NHEADS, qe.DIM_FEEDFORWARD),
        mask_embed=build_mask_embed(d, region.embed_dim(roi_dim, d), m.MASK_EMBED_LAYERS),
        scoring_head=MaskIoUHead(roi_dim, ms.CONV_DIM, ms.NUM_CONVS, ms.FC_DIM, ms.NUM_FC, ms.POOL_SIZE)
        if ms.ENABLED else None,
    )


# ----------------------------------------------------------------------------- meta-arch
@META_ARCH_REGISTRY.register()
class MaskFrozenDETR(nn.Module):
    """Frozen DETR detector + trainable mask network (see the module doc)."""

    @configurable
    def __init__(self, *, detector: nn.Module, mask_network: MaskNetwork, criterion: SetCriterion,
                 c1_feature: str = "res2", num_queries: int = 100, mask_threshold: float = 0.5,
                 test_topk: int = 100):
        super().__init__()
        self.detector = detector
        self.mask_network = mask_network
        self.criterion = criterion
        self.c1_feature = c1_feature
        self.num_queries = num_queries
        self.mask_threshold = mask_threshold
        self.test_topk = test_topk
        self.detector_frozen = True

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        m = cfg.MODEL.MASK_FROZEN
        if m.NUM_QUERIES < 1:
            raise ValueError(f"MODEL.MASK_FROZEN.NUM_QUERIES must be >= 1 (the detector queries that get a mask), "
                             f"got {m.NUM_QUERIES}")
        if m.NUM_QUERIES > cfg.MODEL.DETR.NUM_QUERIES:
            raise ValueError(f"MODEL.MASK_FROZEN.NUM_QUERIES {m.NUM_QUERIES} is larger than the detector's "
                             f"MODEL.DETR.NUM_QUERIES {cfg.MODEL.DETR.NUM_QUERIES}: the mask network selects its top-N "
                             f"among the detector's queries; set MODEL.MASK_FROZEN.NUM_QUERIES <= "
                             f"{cfg.MODEL.DETR.NUM_QUERIES}")
        detector = build_frozen_detector(cfg)
        shapes = detector.backbone.output_shape()
        if m.C1_FEATURE not in shapes:
            raise ValueError(f"MODEL.MASK_FROZEN.C1_FEATURE={m.C1_FEATURE!r} is not a backbone output "
                             f"({sorted(shapes)}); add it to MODEL.RESNETS.OUT_FEATURES")
        c1 = shapes[m.C1_FEATURE]
        mask_network = build_mask_network(cfg, detector, c1.channels, c1.stride)
        return {
            "detector": detector,
            "mask_network": mask_network.to(torch.device(cfg.MODEL.DEVICE)),
            "criterion": build_mask_frozen_criterion(cfg, detector.matcher, mask_network.region),
            "c1_feature": m.C1_FEATURE,
            "num_queries": m.NUM_QUERIES,
            "mask_threshold": m.TEST.MASK_THRESHOLD,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.detector.device

    def train(self, mode: bool = True) -> "MaskFrozenDETR":
        """Train mode for the mask network; the frozen detector stays in eval mode."""
        super().train(mode)
        if self.detector_frozen:
            self.detector.eval()
        return self

    def unfreeze_detector(self) -> None:
        """Make the detector trainable and follow ``train()`` again (end-to-end training,
        e.g. the baseline of tools/benchmark_mask_frozen.py)."""
        self.detector_frozen = False
        for p in self.detector.parameters():
            p.requires_grad_(True)
        self.detector.train(self.training)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        images = self.detector.preprocess_image(batched_inputs)
        with torch.no_grad():
            detected = self.detector.detect(images)
        preds, selected = self.predict_masks(detected)
        if self.training:
            return self.losses(preds, selected, self.prepare_targets(batched_inputs, images))
        return self.inference(preds, selected, batched_inputs, images)

    def predict_masks(self, detected):
        """Select the top-N queries of a detector output and run the mask network on them
        (gradients reach the detector only when it was unfrozen and run with grad)."""
        out = detected.transformer
        selected = self.select_queries(out, detected.images.image_sizes)
        c1 = detected.features[self.c1_feature]
        return self.mask_network(c1, out, selected.embeddings, selected.boxes), selected

    def losses(self, preds: MaskPredictions, selected: "SelectedQueries",
               targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The mask losses of the selected queries: one query set of the shared criterion,
        matched with the detector's costs on its frozen predictions."""
        return self.criterion([QuerySet(self.criterion_outputs(preds, selected))], targets)

    def criterion_outputs(self, preds: MaskPredictions, selected: "SelectedQueries") -> Mapping[str, torch.Tensor]:
        """The selected queries as the criterion reads them (``[B, N, ...]``)."""
        batch = selected.index.shape[0]
        outputs = {"pred_logits": selected.logits, "pred_boxes": selected.boxes_normalized,
                   **self.mask_network.region.criterion_outputs(preds.logits, preds.boxes, batch)}
        if preds.iou is not None:
            outputs["pred_mask_iou"] = preds.iou.unflatten(0, (batch, -1))
        return outputs

    def select_queries(self, out, image_sizes) -> SelectedQueries:
        """Top-N one-to-one queries of the last decoder layer by their best class score."""
        index, _, _ = top_queries(out.final_scores, self.num_queries)
        gather = lambda x: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        boxes_normalized = gather(out.final_boxes)
        # (w, h, w, h) per image; image_sizes: (h, w) pairs or an [N, 2] tensor (exported graph input)
        sizes = torch.as_tensor(image_sizes, device=boxes_normalized.device).view(-1, 2).flip(-1).repeat(1, 2)
        sizes = sizes.to(boxes_normalized.dtype)
        boxes = box_cxcywh_to_xyxy(boxes_normalized) * sizes[:, None]
        boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None])
        logits = out.pred_logits[-1][:, out.query_groups["one2one"]]
        return SelectedQueries(index, gather(out.final_queries), gather(logits), boxes_normalized, boxes)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """The detector's targets (labels, normalised boxes) + GT masks over the padded image."""
        targets = self.detector.prepare_targets(batched_inputs, images.image_sizes)
        padded = tuple(images.tensor.shape[-2:])
        for target, x in zip(targets, batched_inputs):
            target["masks"] = padded_gt_masks(x, padded, self.device, type(self).__name__)
        return targets

    # ------------------------------------------------------------------ inference
    def mask_quality(self, preds: MaskPredictions, rows: slice) -> torch.Tensor:
        """Predicted IoU (scoring head) or the mean mask probability inside the mask."""
        if preds.iou is not None:
            return preds.iou[rows]
        return mask_prob_score(preds.logits[rows].sigmoid(), self.mask_threshold)

    def inference(self, preds: MaskPredictions, selected: SelectedQueries, batched_inputs: List[Dict],
                  images: ImageList) -> List[Dict]:
        num = selected.index.shape[1]
        results = []
        for b, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            rows = slice(b * num, (b + 1) * num)
            pair_scores = selected.logits[b].sigmoid() * self.mask_quality(preds, rows)[:, None]
            order, rows_of_pairs, scores = top_query_class_pairs(pair_scores, self.test_topk)
            classes, kept = self.detector.classes_of_rows(rows_of_pairs)  # class-head rows -> dataset classes
            order, classes, scores = order[kept], classes[kept], scores[kept]
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(selected.boxes[b][order])
            inst.scores = scores
            inst.pred_classes = classes
            self.mask_network.region.attach(inst, preds.logits[rows][order])
            out_h, out_w = x.get("height", h), x.get("width", w)
            results.append({"instances": instances_to_output_size(inst, out_h, out_w, self.mask_threshold)})
        return results
