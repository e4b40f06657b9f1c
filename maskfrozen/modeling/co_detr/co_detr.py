"""``CoDETR``: collaborative hybrid assignments training (Zong et al., ICCV 2023) for any
detector of the DETR meta-arch, attached by config (``MODEL.CO_DETR``, see
:func:`maskfrozen.config.add_co_detr_config`) through the DETR extension registry
(:mod:`maskfrozen.modeling.detr.extensions`, name ``co_detr``): the detector never imports
this package.

Training only, through the detector interface (no patching of the transformer):

1. the :class:`MultiScaleAdapter` turns the encoder memory (``DetectorOutputs.transformer``)
   into a pyramid (+1 coarser level);
2. K auxiliary heads with one-to-many assignment run on it (registered in
   :data:`AUX_HEAD_BUILDERS` by name: ``"atss"``: :class:`ATSSHead`; ``"faster_rcnn"``:
   :class:`FasterRCNNAuxHead`; each ``head(images, features, gt_instances) -> (losses,
   positives)``); their losses, each logged under its own
   name, are the encoder loss ``lambda_2 * (D if the paper's per-decoder-layer sum else 1)
   * sum(term weight * term)`` (the paper sums ``lambda_2 L_enc`` once per decoder layer,
   as the public code's ``num_dec_layer * lambda_2`` factors do);
3. each head's positive boxes become a positive query group decoded by the detector's own
   decoder (all groups in one pass, kept apart by a self-attention mask) and supervised
   with the head's assignment (``_pos{i}`` criterion entries, weight ``lambda_1``;
   :mod:`.positive_queries`).

In eval mode the heads never run: the detector's ``detect`` never calls them, so the
features, queries and scores equal those of the detector without Co-DETR. Only the test
post-processing of the detections is Co-DETR's when ``MODEL.CO_DETR.TEST.POSTPROCESS`` is
"mmdet" (official: boxes clamped to the image, Co-DINO's soft-NMS; :mod:`.postprocess`),
through the DETR extension hook ``postprocess_detections``.
"""
import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy
from maskfrozen.modeling.criterion import QuerySet
from maskfrozen.modeling.detr.extensions import register_detr_extension

from .adapter import MultiScaleAdapter
from .atss import ATSSHead
from .positive_queries import PositiveQueryEmbedding, batch_positives, positive_query_sets
from .postprocess import SoftNMSConfig, mmdet_detections
from .rcnn import FasterRCNNAuxHead

__all__ = ["CoDETR", "build_co_detr", "check_aux_heads", "AUX_HEAD_BUILDERS", "register_aux_head"]

# name -> builder(cfg, adapter_strides, num_encoder_levels) -> head module
AUX_HEAD_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_aux_head(name: str):
    """Decorator: register a builder ``(cfg, adapter_strides, num_encoder_levels) -> head``
    under ``name``, the value ``MODEL.CO_DETR.AUX_HEADS`` lists it by."""
    def register(builder):
        AUX_HEAD_BUILDERS[name] = builder
        return builder
    return register


@register_aux_head("atss")
def _build_atss_head(cfg, strides: Sequence[int], num_encoder_levels: int) -> ATSSHead:
    a, d = cfg.MODEL.CO_DETR.ATSS, cfg.MODEL.DETR
    return ATSSHead(
        d.HIDDEN_DIM, d.NUM_CLASSES, strides, num_convs=a.NUM_CONVS, num_groups=d.GN_GROUPS,
        anchor_scale=a.ANCHOR_SCALE, topk=a.TOPK, focal_alpha=a.FOCAL_ALPHA, focal_gamma=a.FOCAL_GAMMA,
        class_weight=a.CLASS_WEIGHT, box_weight=a.BOX_WEIGHT, centerness_weight=a.CENTERNESS_WEIGHT)


@register_aux_head("faster_rcnn")
def _build_faster_rcnn_head(cfg, strides: Sequence[int], num_encoder_levels: int) -> FasterRCNNAuxHead:
    r, h, d = cfg.MODEL.CO_DETR.RPN, cfg.MODEL.CO_DETR.ROI_HEAD, cfg.MODEL.DETR
    return FasterRCNNAuxHead(
        d.HIDDEN_DIM, d.NUM_CLASSES, strides, num_roi_levels=num_encoder_levels,
        rpn_anchor_scale=r.ANCHOR_SCALE, rpn_scales_per_octave=r.SCALES_PER_OCTAVE,
        rpn_aspect_ratios=r.ASPECT_RATIOS, rpn_iou_thresholds=r.IOU_THRESHOLDS,
        rpn_batch_size_per_image=r.BATCH_SIZE_PER_IMAGE, rpn_positive_fraction=r.POSITIVE_FRACTION,
        rpn_pre_nms_topk=r.PRE_NMS_TOPK, rpn_post_nms_topk=r.POST_NMS_TOPK, rpn_nms_thresh=r.NMS_THRESH,
        rpn_class_weight=r.CLASS_WEIGHT, rpn_box_weight=r.BOX_WEIGHT, rpn_min_pos_iou=r.MIN_POS_IOU,
        pooler_resolution=h.POOLER_RESOLUTION,
        pooler_sampling_ratio=h.SAMPLING_RATIO,
        canonical_box_size=h.CANONICAL_BOX_SIZE, fc_dim=h.FC_DIM, num_fc=h.NUM_FC,
        roi_batch_size_per_image=h.BATCH_SIZE_PER_IMAGE, roi_positive_fraction=h.POSITIVE_FRACTION,
        roi_iou_threshold=h.IOU_THRESHOLD, roi_class_weight=h.CLASS_WEIGHT, roi_box_weight=h.BOX_WEIGHT)


def _event_storage():
    """Detectron2's RPN / RoI heads log to the current EventStorage: open a throwaway one
    when the caller (a test, a benchmark) runs a training step outside a Trainer."""
    try:
        get_event_storage()
        return contextlib.nullcontext()
    except AssertionError:
        return EventStorage()


class CoDETR(nn.Module):
    """Adapter + auxiliary heads + positive-query embeddings (see module doc)."""

    def __init__(self, adapter: MultiScaleAdapter, heads: Sequence[nn.Module], head_types: Sequence[str],
                 query_embeddings: Sequence[PositiveQueryEmbedding], lambda_1: float = 1.0, enc_weight: float = 12.0,
                 max_positives: int = 300, min_queries: int = 9, pad_with_negatives: bool = True,
                 clip_positive_boxes: bool = False, test_postprocess: str = "mmdet",
                 soft_nms: Optional[SoftNMSConfig] = SoftNMSConfig()):
        super().__init__()
        if len(heads) != len(head_types) or len(heads) != len(query_embeddings):
            raise ValueError("CoDETR: one head type and one query embedding per head")
        self.adapter = adapter
        self.heads = nn.ModuleList(heads)
        self.head_types = list(head_types)
        self.query_embeddings = nn.ModuleList(query_embeddings)
        self.lambda_1, self.enc_weight, self.max_positives = lambda_1, enc_weight, max_positives
        self.min_queries, self.pad_with_negatives = min_queries, pad_with_negatives
        self.clip_positive_boxes = clip_positive_boxes
        if test_postprocess not in ("mmdet", "detector"):
            raise ValueError(f"MODEL.CO_DETR.TEST.POSTPROCESS={test_postprocess!r}: expected 'mmdet' or 'detector'")
        self.test_postprocess, self.soft_nms = test_postprocess, soft_nms

    def forward(self, detector, detected, targets: List[Dict[str, torch.Tensor]]
                ) -> Tuple[Dict[str, torch.Tensor], List[QuerySet]]:
        """Encoder losses and positive-query entries of a training batch (the DETR extension
        interface).

        Args:
            detector: the ``DeformableDETRFamily`` (its ``transformer.decode`` is reused).
            detected: its ``DetectorOutputs`` for the batch.
            targets: its ``prepare_targets`` output (labels, normalised cxcywh boxes).
        """
        encoded, images = detected.transformer, detected.images
        features = self.adapter(encoded)
        gt_instances = []
        for t, (h, w) in zip(targets, images.image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=t["boxes"].dtype, device=t["boxes"].device)
            inst = Instances((h, w))
            inst.gt_boxes, inst.gt_classes = Boxes(box_cxcywh_to_xyxy(t["boxes"]) * scale), t["labels"]
            gt_instances.append(inst)
        num_gt = sum(len(t["labels"]) for t in targets)
        losses, groups = {}, []
        with _event_storage():
            for head in self.heads:
                head_losses, positives = head(images, features, gt_instances)
                losses.update({k: v * self.enc_weight for k, v in head_losses.items()})
                groups.append(batch_positives(positives, images.image_sizes, self.max_positives, detector.hidden_dim,
                                              self.min_queries, self.pad_with_negatives, self.clip_positive_boxes))
        return losses, positive_query_sets(detector, encoded, groups, self.query_embeddings, self.lambda_1, num_gt)


    def postprocess_detections(self, scores: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                               output_size: Tuple[int, int], max_detections: int) -> Optional[Instances]:
        """The detector's detections of one image with the official Co-DETR post-processing
        (:func:`.postprocess.mmdet_detections`), or None to keep the detector's own
        (``MODEL.CO_DETR.TEST.POSTPROCESS "detector"``). The DETR extension inference hook."""
        if self.test_postprocess != "mmdet":
            return None
        return mmdet_detections(scores, boxes, image_size, output_size, max_detections, self.soft_nms)


def check_aux_heads(aux_heads: Sequence[str]) -> None:
    """``MODEL.CO_DETR.AUX_HEADS``: registered names, each at most once (ValueError naming
    the key, the offending names and the registered ones otherwise)."""
    registered = ", ".join(sorted(AUX_HEAD_BUILDERS))
    unknown = [h for h in aux_heads if h not in AUX_HEAD_BUILDERS]
    if unknown:
        raise ValueError(f"MODEL.CO_DETR.AUX_HEADS={list(aux_heads)}: unknown auxiliary head(s) {unknown}; "
                         f"registered heads: {registered}")
    repeated = sorted({h for h in aux_heads if list(aux_heads).count(h) > 1})
    if repeated:
        raise ValueError(f"MODEL.CO_DETR.AUX_HEADS={list(aux_heads)}: {repeated} listed more than once (each "
                         f"registered head at most once: {registered})")


@register_detr_extension("co_detr")
def build_co_detr(cfg, level_strides: Sequence[int]):
    """The :class:`CoDETR` of ``cfg.MODEL.CO_DETR`` for a detector whose encoder levels have
    ``level_strides``, or None when disabled or without auxiliary heads (K = 0)."""
    c, d = cfg.MODEL.CO_DETR, cfg.MODEL.DETR
    if not c.ENABLED or not c.AUX_HEADS:
        return None
    check_aux_heads(c.AUX_HEADS)
    adapter = MultiScaleAdapter(d.HIDDEN_DIM, list(level_strides), d.GN_GROUPS)
    heads = [AUX_HEAD_BUILDERS[kind](cfg, adapter.strides, len(level_strides)) for kind in c.AUX_HEADS]
    static = d.QUERY_POS == "static"
    embeddings = [PositiveQueryEmbedding(d.HIDDEN_DIM, static, c.QUERY_FEATURES) for _ in c.AUX_HEADS]
    enc_weight = c.LAMBDA_2 * (d.DEC_LAYERS if c.ENC_LOSS_PER_DECODER_LAYER else 1)
    t = c.TEST
    soft_nms = SoftNMSConfig(t.SOFT_NMS_IOU, t.SOFT_NMS_SIGMA, t.SOFT_NMS_MIN_SCORE, t.SOFT_NMS_METHOD) \
        if t.SOFT_NMS else None
    return CoDETR(adapter, heads, c.AUX_HEADS, embeddings, lambda_1=c.LAMBDA_1, enc_weight=enc_weight,
                  max_positives=c.MAX_POSITIVES, min_queries=c.MIN_POSITIVE_QUERIES,
                  pad_with_negatives=c.PAD_WITH_NEGATIVES, clip_positive_boxes=c.CLIP_POSITIVE_BOXES,
                  test_postprocess=t.POSTPROCESS, soft_nms=soft_nms)
