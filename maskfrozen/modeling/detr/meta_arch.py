"""``DeformableDETR``: one Detectron2 meta-architecture for Deformable-DETR, DINO and H-DETR.

backbone (res3-res5) -> :class:`ChannelMapper` (+1 stride-2 level) -> sine position
+ level embeddings -> :class:`DeformableTransformer` -> :class:`SetCriterion` (training)
or top-k over queries x classes (inference). The variant is chosen by config options
(``MODEL.DETR.*``, see :func:`maskfrozen.config.add_detr_config`).
"""
import math
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.modeling.criterion import HungarianMatcher, SetCriterion
from maskfrozen.modeling.postprocess import top_query_class_pairs

from .denoising import ContrastiveDenoising, DenoisingQueries
from .neck import ChannelMapper
from .transformer import DeformableTransformer, DeformableTransformerOutput

__all__ = ["DeformableDETR"]


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """Deformable-DETR family detector (see module doc).

    Inputs are detectron2's standard batched dicts (``image`` CHW uint8 BGR,
    ``instances`` with ``gt_boxes``/``gt_classes`` in training, ``height``/``width``);
    the model normalises and pads the images itself.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        in_features: List[str],
        neck: ChannelMapper,
        position_embedding: PositionEmbeddingSine,
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        denoising: Optional[ContrastiveDenoising],
        pixel_mean: List[float],
        pixel_std: List[float],
        size_divisibility: int = 32,
        test_topk: int = 100,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.criterion = criterion
        self.denoising = denoising
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        shape = backbone.output_shape()
        strides = [shape[f].stride for f in self.in_features]
        self.level_strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(len(neck.extra_convs))]
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        backbone = build_backbone(cfg)
        shape = backbone.output_shape()
        missing = [f for f in d.IN_FEATURES if f not in shape]
        if missing:
            raise ValueError(f"MODEL.DETR.IN_FEATURES {missing} not produced by the backbone (it gives {sorted(shape)})")
        num_extra = d.NUM_FEATURE_LEVELS - len(d.IN_FEATURES)
        if num_extra < 0:
            raise ValueError(f"MODEL.DETR.NUM_FEATURE_LEVELS={d.NUM_FEATURE_LEVELS} < len(IN_FEATURES)={len(d.IN_FEATURES)}")
        matcher = HungarianMatcher(
            {"class": d.CLASS_COST_WEIGHT, "bbox": d.BBOX_COST_WEIGHT, "giou": d.GIOU_COST_WEIGHT},
            focal_alpha=d.FOCAL_ALPHA, focal_gamma=d.FOCAL_GAMMA)
        criterion = SetCriterion(
            matcher, {"loss_class": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT, "loss_giou": d.GIOU_WEIGHT},
            focal_alpha=d.FOCAL_ALPHA, focal_gamma=d.FOCAL_GAMMA, enc_class_agnostic=d.ENC_CLASS_AGNOSTIC,
            one2many_repeats=d.K_ONE2MANY, one2many_weight=d.LAMBDA_ONE2MANY)
        transformer = DeformableTransformer(
            num_classes=d.NUM_CLASSES, d_model=d.HIDDEN_DIM, nhead=d.NHEADS, num_encoder_layers=d.ENC_LAYERS,
            num_decoder_layers=d.DEC_LAYERS, dim_feedforward=d.DIM_FEEDFORWARD, dropout=d.DROPOUT,
            activation=d.ACTIVATION, num_feature_levels=d.NUM_FEATURE_LEVELS, enc_n_points=d.ENC_N_POINTS,
            dec_n_points=d.DEC_N_POINTS, num_queries=d.NUM_QUERIES, num_queries_one2many=d.NUM_QUERIES_ONE2MANY,
            two_stage=d.TWO_STAGE, box_refine=d.BOX_REFINE, mixed_selection=d.MIXED_SELECTION,
            query_pos=d.QUERY_POS, look_forward_twice=d.LOOK_FORWARD_TWICE,
            decoder_final_norm=d.DECODER_FINAL_NORM, proposal_score="first" if d.ENC_CLASS_AGNOSTIC else "max")
        denoising = None
        if d.DN_NUMBER > 0:
            denoising = ContrastiveDenoising(d.NUM_CLASSES, d.HIDDEN_DIM, d.DN_NUMBER, d.DN_LABEL_NOISE, d.DN_BOX_NOISE)
        return {
            "backbone": backbone,
            "in_features": d.IN_FEATURES,
            "neck": ChannelMapper([shape[f].channels for f in d.IN_FEATURES], d.HIDDEN_DIM, num_extra, d.GN_GROUPS),
            "position_embedding": PositionEmbeddingSine(
                d.HIDDEN_DIM // 2, d.POSITION_TEMPERATURE, normalize=True, offset=d.POSITION_OFFSET),
            "transformer": transformer,
            "criterion": criterion,
            "denoising": denoising,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": d.SIZE_DIVISIBILITY,
            "test_topk": d.TEST_TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        srcs, masks, pos = self.multi_level_features(images)
        if not self.training:
            out = self.transformer(srcs, masks, pos)
            return self.inference(out, batched_inputs, images.image_sizes)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        denoising = self.denoising(targets) if self.denoising is not None else None
        out = self.transformer(srcs, masks, pos, denoising)
        return self.criterion(self.loss_inputs(out, denoising), targets)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def multi_level_features(self, images: ImageList, features: Optional[Dict[str, torch.Tensor]] = None):
        """(features, padding masks, position embeddings) per level; ``features``: the
        backbone outputs when the caller already computed them."""
        features = self.backbone(images.tensor) if features is None else features
        srcs = self.neck([features[f] for f in self.in_features])
        masks = [self.level_padding_mask(images, src.shape[-2:], s) for src, s in zip(srcs, self.level_strides)]
        return srcs, masks, [self.position_embedding(m).to(src.dtype) for m, src in zip(masks, srcs)]

    def detector_outputs(self, batched_inputs: List[Dict]):
        """The inference path without post-processing: (padded ``ImageList``, every backbone
        feature, including those the neck does not use such as ``res2``, and the
        :class:`DeformableTransformerOutput`). Heads on a frozen detector attach here
        (Mask Frozen-DETR)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        srcs, masks, pos = self.multi_level_features(images, features)
        return images, features, self.transformer(srcs, masks, pos)

    def level_padding_mask(self, images: ImageList, size, stride: int) -> torch.Tensor:
        """``[N, H_l, W_l]`` True outside ceil(image size / stride): exactly the cells a
        stride-s conv stack computes from the unpadded image."""
        mask = torch.ones(len(images), *size, dtype=torch.bool, device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, : math.ceil(h / stride), : math.ceil(w / stride)] = False
        return mask

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes) -> List[Dict[str, torch.Tensor]]:
        """GT classes and boxes normalised (cx, cy, w, h) by the unpadded image size."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            if "instances" not in x:
                raise KeyError("DeformableDETR training needs 'instances' in every input dict")
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            targets.append({"labels": inst.gt_classes.long(), "boxes": boxes})
        return targets

    # ------------------------------------------------------------------ losses
    @staticmethod
    def query_set(out: DeformableTransformerOutput, group: str) -> Dict:
        """The criterion's view of one query group: last layer + ``aux_outputs``."""
        sl = out.query_groups[group]
        layers = [{"pred_logits": l[:, sl], "pred_boxes": b[:, sl]} for l, b in zip(out.pred_logits, out.pred_boxes)]
        return {**layers[-1], "aux_outputs": layers[:-1]}

    def loss_inputs(self, out: DeformableTransformerOutput, denoising: Optional[DenoisingQueries]) -> Dict:
        outputs = self.query_set(out, "one2one")
        if out.enc_logits is not None:
            outputs["enc_outputs"] = {"pred_logits": out.enc_logits, "pred_boxes": out.enc_boxes}
        if denoising is not None:
            outputs["dn_outputs"] = {**self.query_set(out, "dn"), "indices": denoising.indices,
                                     "num_groups": denoising.num_groups}
        if "one2many" in out.query_groups:
            outputs["one2many_outputs"] = self.query_set(out, "one2many")
        return outputs

    # ------------------------------------------------------------------ inference
    def inference(self, out: DeformableTransformerOutput, batched_inputs: List[Dict], image_sizes) -> List[Dict]:
        """Top-k over queries x classes of the last layer's one-to-one queries."""
        scores_all, boxes_all = out.final_scores, out.final_boxes
        results = []
        for scores, boxes, x, (h, w) in zip(scores_all, boxes_all, batched_inputs, image_sizes):
            query, label, score = top_query_class_pairs(scores, self.test_topk)
            xyxy = box_cxcywh_to_xyxy(boxes[query]) * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(xyxy)
            inst.pred_boxes.clip((h, w))
            inst.scores = score
            inst.pred_classes = label
            results.append({"instances": detector_postprocess(inst, x.get("height", h), x.get("width", w))})
        return results
