"""Faster R-CNN auxiliary head for Co-DETR, assembled from Detectron2's own parts: ``RPN``
with ``StandardRPNHead`` and ``DefaultAnchorGenerator`` on every adapter level, and
``StandardROIHeads`` (its ``label_and_sample_proposals``, ``ROIPooler`` RoIAlignV2,
``FastRCNNConvFCHead`` with two FC layers, ``FastRCNNOutputLayers`` with the GIoU box loss)
on the encoder levels.

Public Co-DETR settings (the code defaults): RPN anchors ``anchor_scale * stride *
2^(i / scales_per_octave)`` x ratios (0.5, 1, 2), IoU thresholds 0.3 / 0.7, 256 anchors per
image at 50 % positives (a GT's best anchors below 0.7 positive only with IoU >= 0.3, mmdet's
``min_pos_iou``: :class:`.rpn.FlooredLowQualityMatcher`), CE + L1, 4000 / 1000 proposals before / after NMS 0.7; RoI head
7x7 RoIAlign (levels chosen as mmdet's ``finest_scale=56``: level ``floor(log2(sqrt(area)
/ 56))``), 2 x 1024 FC, 512 RoIs per image at 25 % positives (IoU >= 0.5, GT boxes added
as proposals), CE (weight 1) + GIoU on decoded boxes (weight 10), box deltas weights
(10, 10, 5, 5). The positive samples handed to the positive queries are the sampled
foreground proposals, their assigned GT and their mean-pooled RoI feature.

The RPN anchors are Detectron2's size-major order (mmdet's is ratio-major): the Co-DETR
checkpoint converter permutes ``rpn_cls`` / ``rpn_reg`` accordingly.

Three of those parts are drop-in subclasses with the same parameters and results, for the
CPU training cost: ``TruncatedNMSRPN`` / ``FusedRPNHead`` (:mod:`.rpn`: the proposal NMS
stops once ``post_nms_topk`` boxes per level survive; the two 1x1 output convs run as
one) and ``SparseGradROIPooler`` (:mod:`.roi_align`: torchvision's RoIAlign forward, its
backward as one sparse matrix product).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import ImageList, Instances
from torch import nn

from .atss import AuxPositives
from .roi_align import SparseGradROIPooler
from .rpn import FlooredLowQualityMatcher, FusedRPNHead, TruncatedNMSRPN

__all__ = ["FasterRCNNAuxHead", "rpn_anchor_sizes"]


def rpn_anchor_sizes(strides: Sequence[int], anchor_scale: float, scales_per_octave: int) -> List[List[float]]:
    """Per level, the anchor sides ``anchor_scale * stride * 2^(i / scales_per_octave)``
    (mmdet's ``octave_base_scale`` / ``scales_per_octave``)."""
    return [[anchor_scale * s * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)] for s in strides]


class FasterRCNNAuxHead(nn.Module):
    """RPN + RoI head (see module doc). ``forward(images, features, gt_instances)``
    (training only; ``gt_instances`` with ``gt_boxes``, ``gt_classes``) returns the weighted
    losses ``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_rcnn_cls``, ``loss_rcnn_bbox`` and each
    image's :class:`AuxPositives`."""

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int], num_roi_levels: int,
                 rpn_anchor_scale: float = 4.0, rpn_scales_per_octave: int = 3,
                 rpn_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_iou_thresholds: Sequence[float] = (0.3, 0.7),
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_pre_nms_topk: int = 4000, rpn_post_nms_topk: int = 1000, rpn_nms_thresh: float = 0.7,
                 rpn_class_weight: float = 1.0, rpn_box_weight: float = 1.0, rpn_min_pos_iou: float = 0.3,
                 pooler_resolution: int = 7,
                 pooler_sampling_ratio: int = 0,
                 canonical_box_size: int = 56, fc_dim: int = 1024, num_fc: int = 2, roi_batch_size_per_image: int = 512,
                 roi_positive_fraction: float = 0.25, roi_iou_threshold: float = 0.5, roi_class_weight: float = 1.0,
                 roi_box_weight: float = 10.0):
        super().__init__()
        names = [f"p{i}" for i in range(len(strides))]
        sizes = rpn_anchor_sizes(strides, rpn_anchor_scale, rpn_scales_per_octave)
        anchor_generator = DefaultAnchorGenerator(sizes=sizes, aspect_ratios=[list(rpn_aspect_ratios)],
                                                  strides=list(strides), offset=0.0)
        self.rpn = TruncatedNMSRPN(
            in_features=names,
            head=FusedRPNHead(in_channels=channels, num_anchors=anchor_generator.num_anchors[0]),
            anchor_generator=anchor_generator,
            anchor_matcher=FlooredLowQualityMatcher(list(rpn_iou_thresholds), [0, -1, 1], rpn_min_pos_iou),
            box2box_transform=Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)),
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_topk=(rpn_pre_nms_topk, rpn_pre_nms_topk), post_nms_topk=(rpn_post_nms_topk, rpn_post_nms_topk),
            nms_thresh=rpn_nms_thresh, loss_weight={"loss_rpn_cls": rpn_class_weight, "loss_rpn_loc": rpn_box_weight},
            box_reg_loss_type="smooth_l1", smooth_l1_beta=0.0)
        roi_names = names[:num_roi_levels]
        min_level = int(math.log2(strides[0]))
        pooled = ShapeSpec(channels=channels, height=pooler_resolution, width=pooler_resolution)
        box_head = FastRCNNConvFCHead(pooled, conv_dims=[], fc_dims=[fc_dim] * num_fc)
        self.roi_heads = StandardROIHeads(
            box_in_features=roi_names,
            box_pooler=SparseGradROIPooler((pooler_resolution, pooler_resolution),
                                           [1.0 / s for s in strides[:num_roi_levels]],
                                           sampling_ratio=pooler_sampling_ratio, pooler_type="ROIAlignV2",
                                           canonical_box_size=canonical_box_size, canonical_level=min_level),
            box_head=box_head,
            box_predictor=FastRCNNOutputLayers(
                box_head.output_shape, box2box_transform=Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0)),
                num_classes=num_classes, box_reg_loss_type="giou",
                loss_weight={"loss_cls": roi_class_weight, "loss_box_reg": roi_box_weight}),
            num_classes=num_classes, batch_size_per_image=roi_batch_size_per_image,
            positive_fraction=roi_positive_fraction,
            proposal_matcher=Matcher([roi_iou_threshold], [0, 1], allow_low_quality_matches=False),
            proposal_append_gt=True)
        self.names = names

    def forward(self, images: ImageList, features: List[torch.Tensor],
                gt_instances: List[Instances]) -> Tuple[Dict[str, torch.Tensor], List[AuxPositives]]:
        feats = dict(zip(self.names, features))
        # gt_index: detectron2 copies every "gt_*" field of the matched GT onto the sampled proposals
        for inst in gt_instances:
            inst.gt_index = torch.arange(len(inst), device=inst.gt_boxes.device)
        proposals, losses = self.rpn(images, feats, gt_instances)
        proposals = self.roi_heads.label_and_sample_proposals(proposals, gt_instances)
        roi = self.roi_heads
        box_features = roi.box_pooler([feats[f] for f in roi.box_in_features], [p.proposal_boxes for p in proposals])
        predictions = roi.box_predictor(roi.box_head(box_features))
        rcnn = roi.box_predictor.losses(predictions, proposals)
        losses.update({"loss_rcnn_cls": rcnn["loss_cls"], "loss_rcnn_bbox": rcnn["loss_box_reg"]})
        pooled = box_features.mean((2, 3)).split([len(p) for p in proposals])
        positives = []
        for p, feat in zip(proposals, pooled):
            fg = torch.nonzero(p.gt_classes < roi.num_classes).squeeze(1)
            bg = torch.nonzero(p.gt_classes == roi.num_classes).squeeze(1)
            gt_index = p.gt_index[fg] if p.has("gt_index") else fg.new_zeros(0)
            boxes = p.proposal_boxes.tensor
            positives.append(AuxPositives(boxes[fg], gt_index, feat[fg], boxes[bg], feat[bg]))
        return losses, positives
