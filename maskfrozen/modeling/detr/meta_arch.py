"""``DeformableDETRFamily``: one Detectron2 meta-architecture for Deformable-DETR, DINO
and H-DETR (registered also under its former name ``DeformableDETR``).

backbone (res3-res5) -> :class:`ChannelMapper` (+1 stride-2 level) -> sine position
+ level embeddings -> :class:`DeformableTransformer` -> :class:`SetCriterion` (training)
or top-k over queries x classes (inference). The variant is chosen by config options
(``MODEL.DETR.*``, see :func:`maskfrozen.config.add_detr_config`).

The detector interface, used by heads that attach to a detector (Mask Frozen-DETR on a
frozen one, Co-DETR's auxiliary heads, the benchmarks) instead of reaching into it:

- ``preprocess_image(batched_inputs) -> ImageList`` (normalised, padded);
- ``prepare_targets(batched_inputs, image_sizes)`` -> per image ``labels``, ``boxes``;
- ``detect(images, targets=None) -> DetectorOutputs``: every backbone feature and the
  transformer's structured output (with DINO's denoising queries when targets are given
  in training);
- ``losses(detected, targets)``: the detector's own losses (its query sets through the
  shared criterion); ``query_sets(detected, targets)`` the entries themselves;
- ``hidden_dim``, ``num_feature_levels``, ``matcher`` (the detector's Hungarian matcher).

Training extensions (e.g. Co-DETR's auxiliary heads) attach through the registry of
:mod:`.extensions`: each registered builder may return a module, held as an attribute of
its registered name and called by ``losses`` in training (extra losses and query-set
entries) and, if it has its own test post-processing, by ``inference``
(``extension_detections``); this module names none of them.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from maskfrozen.checkpoint.detr_converter import coco_contiguous_ids
from maskfrozen.modeling.inputs import normalized_image_batch, padding_mask
from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.modeling.criterion import (HungarianMatcher, QuerySet, SetCriterion, class_agnostic_targets,
                                           repeat_targets)
from maskfrozen.modeling.postprocess import top_query_class_pairs

from .denoising import ContrastiveDenoising, DenoisingQueries
from .extensions import build_detr_extensions
from .neck import ChannelMapper
from .transformer import DeformableTransformer, DeformableTransformerOutput

CLASS_ROWS = ("contiguous", "coco_category_id")
LEVEL_MASKS = ("interpolate", "ceil")
ENC_LOSS_TOKENS = ("all", "selected")

__all__ = ["DeformableDETRFamily", "DeformableDETR", "DetectorOutputs"]


@dataclass
class DetectorOutputs:
    """What :meth:`DeformableDETRFamily.detect` computes for a batch."""

    images: ImageList  # normalised, padded input
    features: Dict[str, torch.Tensor]  # every backbone output, including those the neck skips (res2)
    transformer: DeformableTransformerOutput
    denoising: Optional[DenoisingQueries] = None  # DINO's queries (training with targets)


@META_ARCH_REGISTRY.register()
class DeformableDETRFamily(nn.Module):
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
        size_divisibility: int = 0,
        test_topk: int = 100,
        enc_class_agnostic: bool = True,
        one2many_repeats: int = 6,
        one2many_weight: float = 1.0,
        extensions: Optional[Dict[str, Optional[nn.Module]]] = None,
        class_rows: Optional[List[int]] = None,
        level_masks: str = "interpolate",
        enc_loss_tokens: str = "all",
        clip_boxes: bool = False,
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
        self.enc_class_agnostic = enc_class_agnostic
        self.one2many_repeats, self.one2many_weight = one2many_repeats, one2many_weight
        if level_masks not in LEVEL_MASKS or enc_loss_tokens not in ENC_LOSS_TOKENS:
            raise ValueError(f"level_masks must be one of {LEVEL_MASKS} (got {level_masks!r}), enc_loss_tokens one of "
                             f"{ENC_LOSS_TOKENS} (got {enc_loss_tokens!r})")
        self.level_masks, self.enc_loss_tokens, self.clip_boxes = level_masks, enc_loss_tokens, clip_boxes
        self.set_class_rows(class_rows)
        self.extension_names = list(extensions or {})  # training-only modules (.extensions)
        for name, module in (extensions or {}).items():
            if hasattr(self, name):
                raise ValueError(f"DETR extension name {name!r} clashes with an attribute of {type(self).__name__}")
            setattr(self, name, module)  # None: that extension is off
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
        num_extra = _check_detr_config(cfg, shape)
        denoising = None
        if d.DN_NUMBER > 0:
            denoising = ContrastiveDenoising(d.NUM_CLASSES, d.HIDDEN_DIM, d.DN_NUMBER, d.DN_LABEL_NOISE, d.DN_BOX_NOISE,
                                             d.INVERSE_SIGMOID_EPS)
        strides = [shape[f].stride for f in d.IN_FEATURES]
        return {
            "backbone": backbone,
            "in_features": d.IN_FEATURES,
            "neck": ChannelMapper([shape[f].channels for f in d.IN_FEATURES], d.HIDDEN_DIM, num_extra, d.GN_GROUPS),
            "position_embedding": PositionEmbeddingSine(
                d.HIDDEN_DIM // 2, d.POSITION_TEMPERATURE, normalize=True, offset=d.POSITION_OFFSET),
            "transformer": _build_transformer(d),
            "criterion": _build_criterion(d),
            "denoising": denoising,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": d.SIZE_DIVISIBILITY,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE,
            "enc_class_agnostic": d.ENC_CLASS_AGNOSTIC,
            "one2many_repeats": d.K_ONE2MANY,
            "one2many_weight": d.LAMBDA_ONE2MANY,
            "extensions": build_detr_extensions(cfg, strides + [strides[-1] * 2 ** (i + 1) for i in range(num_extra)]),
            "class_rows": coco_contiguous_ids() if d.CLASS_ROWS == "coco_category_id" else None,
            "level_masks": d.LEVEL_MASKS,
            "enc_loss_tokens": d.ENC_LOSS_TOKENS,
            "clip_boxes": d.CLIP_BOXES,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def hidden_dim(self) -> int:
        """Channels of the transformer (queries, memory)."""
        return self.transformer.d_model

    @property
    def num_feature_levels(self) -> int:
        return len(self.level_strides)

    @property
    def matcher(self) -> HungarianMatcher:
        return self.criterion.matcher

    # ------------------------------------------------------------------ class rows
    def set_class_rows(self, class_rows: Optional[List[int]]) -> None:
        """``class_rows[k]`` = the class-head row of dataset class k (None: row k is class k).
        With a mapping (the official 91-row heads: row = COCO category id), targets are given
        as rows and detections are mapped back, rows of no dataset class dropped."""
        num_rows = self.transformer.num_classes
        if class_rows is None:
            self.row_of_class = self.class_of_row = None
            return
        if len(set(class_rows)) != len(class_rows) or not all(0 <= r < num_rows for r in class_rows):
            raise ValueError(f"class rows must be distinct rows of the {num_rows}-row class heads, got {class_rows}")
        self.row_of_class = torch.as_tensor(class_rows, dtype=torch.int64)
        self.class_of_row = torch.full((num_rows,), -1, dtype=torch.int64)
        self.class_of_row[self.row_of_class] = torch.arange(len(class_rows))

    def classes_of_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dataset class, kept) of class-head rows: ``kept`` is False for a row that is no
        class of the dataset (such detections are dropped)."""
        if self.class_of_row is None:
            return rows, torch.ones_like(rows, dtype=torch.bool)
        classes = self.class_of_row.to(rows.device)[rows]
        return classes, classes >= 0

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            return self.inference(self.detect(images).transformer, batched_inputs, images.image_sizes)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        return self.losses(self.detect(images, targets), targets)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        return normalized_image_batch(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def detect(self, images: ImageList, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> DetectorOutputs:
        """Backbone, neck and transformer on a preprocessed batch (no post-processing);
        with ``targets`` in training, DINO's denoising queries join the decoder."""
        features = self.backbone(images.tensor)
        srcs = self.neck([features[f] for f in self.in_features])
        image_mask = self.image_padding_mask(images)
        masks = [self.level_padding_mask(images, image_mask, src.shape[-2:], s) for src, s in zip(srcs, self.level_strides)]
        pos = [self.position_embedding(m).to(src.dtype) for m, src in zip(masks, srcs)]
        use_denoising = self.denoising is not None and targets is not None and self.training
        denoising = self.denoising(targets) if use_denoising else None
        return DetectorOutputs(images, features, self.transformer(srcs, masks, pos, denoising), denoising)

    def image_padding_mask(self, images: ImageList) -> torch.Tensor:
        """``[N, H, W]`` True on the padding of the batch image."""
        return padding_mask(images.image_sizes, images.tensor.shape[-2:], 1, self.device)

    def level_padding_mask(self, images: ImageList, image_mask: torch.Tensor, size, stride: int) -> torch.Tensor:
        """``[N, H_l, W_l]`` padding mask of a level: the image's mask resized (nearest) to the
        level, as the official code ("interpolate"), or True outside ceil(image size / stride),
        exactly the cells a stride-s conv stack computes from the unpadded image ("ceil")."""
        if self.level_masks == "interpolate":
            return F.interpolate(image_mask[None].float(), size=tuple(size)).to(torch.bool)[0]
        return padding_mask(images.image_sizes, size, stride, self.device)

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes) -> List[Dict[str, torch.Tensor]]:
        """GT labels (the class-head rows of the GT classes) and boxes normalised (cx, cy, w, h)
        by the unpadded image size."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            if "instances" not in x:
                raise KeyError(f"{type(self).__name__} training needs 'instances' in every input dict")
            inst = x["instances"].to(self.device)
            gt = inst.gt_boxes.tensor
            scale = torch.tensor([w, h, w, h], dtype=gt.dtype, device=self.device)
            labels = inst.gt_classes.long()
            if self.row_of_class is not None:
                labels = self.row_of_class.to(labels.device)[labels]
            targets.append({"labels": labels, "boxes": box_xyxy_to_cxcywh(gt / scale)})
        return targets

    # ------------------------------------------------------------------ losses
    @staticmethod
    def group_outputs(out: DeformableTransformerOutput, group: str) -> Dict:
        """The criterion's view of one query group: last layer + ``aux_outputs``."""
        sl = out.query_groups[group]
        layers = [{"pred_logits": l[:, sl], "pred_boxes": b[:, sl]} for l, b in zip(out.pred_logits, out.pred_boxes)]
        return {**layers[-1], "aux_outputs": layers[:-1]}

    def query_sets(self, detected: DetectorOutputs, targets: List[Dict[str, torch.Tensor]]) -> List[QuerySet]:
        """The supervised entries: one-to-one queries (+ encoder proposals, denoising,
        one-to-many, each one entry of the shared criterion)."""
        out, denoising = detected.transformer, detected.denoising
        sets = [QuerySet(self.group_outputs(out, "one2one"))]
        if out.proposals is not None:
            p = out.proposals
            enc = {"pred_logits": p.logits, "pred_boxes": p.boxes} if self.enc_loss_tokens == "all" else \
                {"pred_logits": p.selected_logits, "pred_boxes": p.selected_boxes}
            enc_targets = class_agnostic_targets(targets) if self.enc_class_agnostic else None
            sets.append(QuerySet(enc, "_enc", enc_targets))
        if denoising is not None:
            sets.append(QuerySet(self.group_outputs(out, "dn"), "_dn", indices=denoising.indices,
                                 normalizer=denoising.num_groups))
        if "one2many" in out.query_groups:
            k = self.one2many_repeats
            sets.append(QuerySet(self.group_outputs(out, "one2many"), "_one2many", repeat_targets(targets, k),
                                 weight=self.one2many_weight, normalizer=k))
        return sets

    def losses(self, detected: DetectorOutputs, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The detector's weighted losses (``loss_<term><suffix>[_aux<i>]``); in training, also
        each active extension's losses and query-set entries."""
        sets, extension_losses = self.query_sets(detected, targets), {}
        for name in self.extension_names if self.training else ():
            extension = getattr(self, name)
            if extension is not None:
                more_losses, more_sets = extension(self, detected, targets)
                extension_losses.update(more_losses)
                sets = sets + list(more_sets)
        return {**self.criterion(sets, targets), **extension_losses}

    # ------------------------------------------------------------------ inference
    def extension_detections(self, scores: torch.Tensor, boxes: torch.Tensor, image_size,
                             output_size) -> Optional[Instances]:
        """One image's detections from the first active extension with its own test
        post-processing (``postprocess_detections(scores [Q, K], boxes [Q, 4] cxcywh, image_size,
        output_size, max_detections) -> Instances`` with class-head rows as ``pred_classes``, or
        None), rows mapped to dataset classes; None when no extension post-processes."""
        for name in self.extension_names:
            extension = getattr(self, name)
            postprocess = getattr(extension, "postprocess_detections", None)
            result = postprocess(scores, boxes, image_size, output_size, self.test_topk) if postprocess else None
            if result is not None:
                classes, kept = self.classes_of_rows(result.pred_classes)
                result.pred_classes = classes
                return result[kept]
        return None

    def inference(self, out: DeformableTransformerOutput, batched_inputs: List[Dict], image_sizes) -> List[Dict]:
        """Top-k over queries x class rows of the last layer's one-to-one queries (official
        post-processing: boxes scaled to the requested output size, not clipped); rows of no
        dataset class dropped. ``clip_boxes`` (ours): detectron2's ``detector_postprocess``
        (boxes clipped to the image, empty ones dropped)."""
        results = []
        for scores, boxes, x, (h, w) in zip(out.final_scores, out.final_boxes, batched_inputs, image_sizes):
            extension_result = self.extension_detections(scores, boxes, (h, w), (x.get("height", h), x.get("width", w)))
            if extension_result is not None:
                results.append({"instances": extension_result})
                continue
            query, row, score = top_query_class_pairs(scores, self.test_topk)
            classes, kept = self.classes_of_rows(row)
            query, classes, score = query[kept], classes[kept], score[kept]
            out_h, out_w = x.get("height", h), x.get("width", w)
            size = (h, w) if self.clip_boxes else (out_h, out_w)
            scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=boxes.dtype, device=boxes.device)
            inst = Instances(size)
            inst.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes[query]) * scale)
            inst.scores = score
            inst.pred_classes = classes
            results.append({"instances": detector_postprocess(inst, out_h, out_w) if self.clip_boxes else inst})
        return results


def _check_detr_config(cfg, shape) -> int:
    """Config errors that the modules would only reveal later; returns the extra levels."""
    d = cfg.MODEL.DETR
    missing = [f for f in d.IN_FEATURES if f not in shape]
    if missing:
        raise ValueError(f"MODEL.DETR.IN_FEATURES {missing} not produced by the backbone (it gives {sorted(shape)})")
    num_extra = d.NUM_FEATURE_LEVELS - len(d.IN_FEATURES)
    if num_extra < 0:
        raise ValueError(f"MODEL.DETR.NUM_FEATURE_LEVELS={d.NUM_FEATURE_LEVELS} < len(IN_FEATURES)={len(d.IN_FEATURES)}")
    if d.NUM_QUERIES < 1:
        raise ValueError(f"MODEL.DETR.NUM_QUERIES must be >= 1, got {d.NUM_QUERIES} (the one-to-one queries are "
                         "the detections)")
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {cfg.TEST.DETECTIONS_PER_IMAGE}")
    for key, allowed in (("CLASS_ROWS", CLASS_ROWS), ("LEVEL_MASKS", LEVEL_MASKS), ("ENC_LOSS_TOKENS", ENC_LOSS_TOKENS)):
        if d[key] not in allowed:
            raise ValueError(f"MODEL.DETR.{key} must be one of {list(allowed)}, got {d[key]!r}")
    if d.CLASS_ROWS == "coco_category_id" and d.NUM_CLASSES != 91:
        raise ValueError(f"MODEL.DETR.CLASS_ROWS 'coco_category_id' needs NUM_CLASSES 91 (a row per COCO category id "
                         f"0..90, as the official checkpoints), got {d.NUM_CLASSES}; for a dataset of your own set "
                         f"CLASS_ROWS 'contiguous' and NUM_CLASSES to its class count")
    return num_extra


def _build_transformer(d) -> DeformableTransformer:
    return DeformableTransformer(
        num_classes=d.NUM_CLASSES, d_model=d.HIDDEN_DIM, nhead=d.NHEADS, num_encoder_layers=d.ENC_LAYERS,
        num_decoder_layers=d.DEC_LAYERS, dim_feedforward=d.DIM_FEEDFORWARD, dropout=d.DROPOUT,
        activation=d.ACTIVATION, num_feature_levels=d.NUM_FEATURE_LEVELS, enc_n_points=d.ENC_N_POINTS,
        dec_n_points=d.DEC_N_POINTS, num_queries=d.NUM_QUERIES, num_queries_one2many=d.NUM_QUERIES_ONE2MANY,
        two_stage=d.TWO_STAGE, box_refine=d.BOX_REFINE, mixed_selection=d.MIXED_SELECTION,
        query_pos=d.QUERY_POS, look_forward_twice=d.LOOK_FORWARD_TWICE, decoder_final_norm=d.DECODER_FINAL_NORM,
        proposal_score="first" if d.ENC_CLASS_AGNOSTIC else "max", proposals_valid_only=d.PROPOSALS_VALID_ONLY,
        share_decoder_heads=d.SHARE_DECODER_HEADS, query_pos_reference=d.QUERY_POS_REFERENCE,
        inverse_sigmoid_eps=d.INVERSE_SIGMOID_EPS)


def _build_criterion(d) -> SetCriterion:
    matcher = HungarianMatcher(
        {"class": d.CLASS_COST_WEIGHT, "bbox": d.BBOX_COST_WEIGHT, "giou": d.GIOU_COST_WEIGHT},
        focal_alpha=d.FOCAL_ALPHA, focal_gamma=d.FOCAL_GAMMA)
    return SetCriterion(
        matcher, {"loss_class": d.CLASS_WEIGHT, "loss_bbox": d.BBOX_WEIGHT, "loss_giou": d.GIOU_WEIGHT},
        losses=("labels", "boxes"), focal_alpha=d.FOCAL_ALPHA, focal_gamma=d.FOCAL_GAMMA, class_loss=d.CLASS_LOSS,
        qfl_beta=d.QFL_BETA)


@META_ARCH_REGISTRY.register()
class DeformableDETR(DeformableDETRFamily):
    """The former name of :class:`DeformableDETRFamily`, kept so existing configs
    (``META_ARCHITECTURE: "DeformableDETR"``) and checkpoints load unchanged."""
