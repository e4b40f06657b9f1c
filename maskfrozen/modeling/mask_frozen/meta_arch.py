"""``MaskFrozenDETR``: instance masks from a frozen DETR detector (arXiv 2308.03747).

The detector (any meta-arch of our DETR family, built from the same config's
``MODEL.DETR`` / backbone sections) is loaded from ``MODEL.MASK_FROZEN.DETECTOR_WEIGHTS``
and frozen: no parameter requires grad, it stays in eval mode when the model is put in
train mode, and it runs under ``no_grad``. Only the :class:`MaskNetwork` trains.

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
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from detectron2.utils.file_io import PathManager
from torch import nn

from maskfrozen.engine.freeze import pin_eval_mode
from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy
from maskfrozen.modeling.criterion.matcher import HungarianMatcher
from maskfrozen.modeling.postprocess import (instances_to_output_size, mask_prob_score, top_queries,
                                             top_query_class_pairs)

from .box_encoder import build_box_encoder
from .criterion import MaskFrozenCriterion
from .image_encoder import build_image_encoder
from .mask_network import C1Neck, MaskNetwork, MaskPredictions, build_mask_embed
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
def load_detector_weights(detector: nn.Module, path: str) -> None:
    """Load a detector checkpoint strictly: a missing file, missing/unexpected keys or
    shape mismatches raise an error naming them. Accepts a detector checkpoint or a
    whole MaskFrozenDETR checkpoint (its ``detector.`` entries)."""
    local = PathManager.get_local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.MASK_FROZEN.DETECTOR_WEIGHTS={path!r}: no such file; train the detector first "
                                f"(tools/train_net.py with its DETR config) or point to its model_final.pth")
    state = DetectionCheckpointer(detector)._load_file(local)["model"]
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    if any(k.startswith("detector.") for k in state):
        state = {k[len("detector."):]: v for k, v in state.items() if k.startswith("detector.")}
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
    """No parameter requires grad and the module stays in eval mode."""
    for p in detector.parameters():
        p.requires_grad_(False)
    pin_eval_mode(detector)


def build_frozen_detector(cfg: CfgNode) -> nn.Module:
    """The detector of ``MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE`` built from this
    config, loaded from ``DETECTOR_WEIGHTS`` and frozen."""
    m = cfg.MODEL.MASK_FROZEN
    name = m.DETECTOR_META_ARCHITECTURE
    if name == "MaskFrozenDETR" or name not in META_ARCH_REGISTRY:
        raise ValueError(f"MODEL.MASK_FROZEN.DETECTOR_META_ARCHITECTURE={name!r} is not a registered detector "
                         f"meta-architecture (e.g. 'DeformableDETR')")
    det_cfg = cfg.clone()
    det_cfg.defrost()
    det_cfg.MODEL.META_ARCHITECTURE = name
    detector = META_ARCH_REGISTRY.get(name)(det_cfg)
    detector.to(torch.device(cfg.MODEL.DEVICE))
    if m.DETECTOR_WEIGHTS:
        load_detector_weights(detector, m.DETECTOR_WEIGHTS)
    elif m.ALLOW_RANDOM_DETECTOR:
        logger.warning("MaskFrozenDETR: MODEL.MASK_FROZEN.DETECTOR_WEIGHTS is empty, using a RANDOM detector "
                       "(ALLOW_RANDOM_DETECTOR: True, meant for tests)")
    else:
        raise ValueError("MODEL.MASK_FROZEN.DETECTOR_WEIGHTS is empty: Mask Frozen-DETR needs the checkpoint of a "
                         "trained detector (set ALLOW_RANDOM_DETECTOR: True only for tests)")
    freeze_detector(detector)
    return detector


def build_mask_network(cfg: CfgNode, c1_channels: int, c1_stride: int) -> MaskNetwork:
    """The :class:`MaskNetwork` of ``MODEL.MASK_FROZEN`` for a detector of width
    ``MODEL.DETR.HIDDEN_DIM``."""
    m, d = cfg.MODEL.MASK_FROZEN, cfg.MODEL.DETR.HIDDEN_DIM
    ie, be, qe, ms = m.IMAGE_ENCODER, m.BOX_ENCODER, m.QUERY_ENCODER, m.MASK_SCORING
    box_encoder = build_box_encoder(be.NAME, d, be.DIM, be.DEPTH, m.ROI_SIZE, be.NHEADS, be.DIM_FEEDFORWARD)
    roi_dim = box_encoder.out_channels
    return MaskNetwork(
        region=m.MASK_REGION,
        neck=C1Neck(m.NECK, c1_channels, d, m.NECK_GN_GROUPS),
        image_encoder=build_image_encoder(ie.NAME, d, ie.DEPTH, cfg.MODEL.DETR.NUM_FEATURE_LEVELS, ie.NHEADS,
                                          ie.N_POINTS, ie.DIM_FEEDFORWARD, ie.WINDOW_SIZE),
        box_encoder=box_encoder,
        query_encoder=QueryFeatureEncoder(qe.NAME, d, roi_dim, m.ROI_SIZE, qe.DEPTH, qe.NHEADS, qe.DIM_FEEDFORWARD),
        mask_embed=build_mask_embed(d, roi_dim if m.MASK_REGION == "box" else d, m.MASK_EMBED_LAYERS),
        scoring_head=MaskIoUHead(roi_dim, ms.CONV_DIM, ms.NUM_CONVS, ms.FC_DIM, ms.NUM_FC, ms.POOL_SIZE)
        if ms.ENABLED else None,
        roi_size=m.ROI_SIZE,
        c1_stride=c1_stride,
        roi_sampling_ratio=m.ROI_SAMPLING_RATIO,
    )


# ----------------------------------------------------------------------------- meta-arch
@META_ARCH_REGISTRY.register()
class MaskFrozenDETR(nn.Module):
    """Frozen DETR detector + trainable mask network (see the module doc)."""

    @configurable
    def __init__(self, *, detector: nn.Module, mask_network: MaskNetwork, criterion: MaskFrozenCriterion,
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

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        m = cfg.MODEL.MASK_FROZEN
        detector = build_frozen_detector(cfg)
        shapes = detector.backbone.output_shape()
        if m.C1_FEATURE not in shapes:
            raise ValueError(f"MODEL.MASK_FROZEN.C1_FEATURE={m.C1_FEATURE!r} is not a backbone output "
                             f"({sorted(shapes)}); add it to MODEL.RESNETS.OUT_FEATURES")
        d = cfg.MODEL.DETR
        matcher = HungarianMatcher(
            {"class": d.CLASS_COST_WEIGHT, "bbox": d.BBOX_COST_WEIGHT, "giou": d.GIOU_COST_WEIGHT},
            focal_alpha=d.FOCAL_ALPHA, focal_gamma=d.FOCAL_GAMMA)
        criterion = MaskFrozenCriterion(
            matcher, {"loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT, "loss_mask_iou": m.MASK_IOU_WEIGHT},
            m.NUM_POINTS, m.OVERSAMPLE_RATIO, m.IMPORTANCE_SAMPLE_RATIO)
        c1 = shapes[m.C1_FEATURE]
        return {
            "detector": detector,
            "mask_network": build_mask_network(cfg, c1.channels, c1.stride).to(torch.device(cfg.MODEL.DEVICE)),
            "criterion": criterion,
            "c1_feature": m.C1_FEATURE,
            "num_queries": m.NUM_QUERIES,
            "mask_threshold": m.TEST.MASK_THRESHOLD,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.detector.device

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        with torch.no_grad():
            images, features, out = self.detector.detector_outputs(batched_inputs)
            selected = self.select_queries(out, images.image_sizes)
        preds = self.mask_network(features[self.c1_feature], out, selected.embeddings, selected.boxes)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            matcher_view = {"pred_logits": selected.logits, "pred_boxes": selected.boxes_normalized}
            return self.criterion(preds, matcher_view, targets)
        return self.inference(preds, selected, batched_inputs, images)

    def select_queries(self, out, image_sizes) -> SelectedQueries:
        """Top-N one-to-one queries of the last decoder layer by their best class score."""
        index, _, _ = top_queries(out.final_scores, self.num_queries)
        gather = lambda x: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        boxes_normalized = gather(out.final_boxes)
        sizes = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=boxes_normalized.dtype,
                             device=boxes_normalized.device)
        boxes = box_cxcywh_to_xyxy(boxes_normalized) * sizes[:, None]
        boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None])
        logits = out.pred_logits[-1][:, out.query_groups["one2one"]]
        return SelectedQueries(index, gather(out.final_queries), gather(logits), boxes_normalized, boxes)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """The detector's targets (labels, normalised boxes) + GT masks over the padded image."""
        targets = self.detector.prepare_targets(batched_inputs, images.image_sizes)
        padded_h, padded_w = images.tensor.shape[-2:]
        for target, x in zip(targets, batched_inputs):
            inst = x["instances"]
            if not inst.has("gt_masks"):
                raise KeyError("MaskFrozenDETR training needs 'gt_masks' in the instances: set MODEL.MASK_ON True "
                               "so the dataset mapper keeps the masks")
            masks = inst.gt_masks
            if isinstance(masks, PolygonMasks):
                masks = BitMasks.from_polygon_masks(masks, *inst.image_size)
            masks = masks.tensor.to(self.device, torch.bool)
            target["masks"] = F.pad(masks, (0, padded_w - masks.shape[-1], 0, padded_h - masks.shape[-2]))
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
        stride = self.mask_network.c1_stride
        results = []
        for b, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            rows = slice(b * num, (b + 1) * num)
            pair_scores = selected.logits[b].sigmoid() * self.mask_quality(preds, rows)[:, None]
            order, labels, scores = top_query_class_pairs(pair_scores, self.test_topk)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(selected.boxes[b][order])
            inst.scores = scores
            inst.pred_classes = labels
            logits = preds.logits[rows][order]
            if preds.region == "box":
                inst.pred_masks = logits.sigmoid()  # [n, 1, S, S], pasted into the boxes at the output size
            else:
                full = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)
                inst.pred_mask_probs = full[:, 0, :h, :w].sigmoid()
            out_h, out_w = x.get("height", h), x.get("width", w)
            results.append({"instances": instances_to_output_size(inst, out_h, out_w, self.mask_threshold)})
        return results
