"""``QuerySegmentor``: one Detectron2 meta-architecture for query-based instance segmentation
(Mask2Former, FastInst), see :mod:`maskfrozen.modeling.query_seg.interface`.

backbone -> pixel decoder (``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``) -> transformer decoder
(``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``) -> the shared ``SetCriterion`` (softmax class
loss with no-object weight, point-sampled mask BCE + dice, Hungarian matching with the same
point-sampled costs) in training, or the shared instance post-processing at inference, as the
official Mask2Former / FastInst ``instance_inference``: the top-k (query, class) pairs by
p_class (all k kept, empty masks too), mask logits resized to the requested output size
(through the padded input size, the padding cropped), masks = sigmoid > threshold, score =
p_class x mean mask probability inside the mask; plus boxes from the masks (ours: the official
code returns zero boxes). ``MODEL.MASK_FORMER.TEST.POSTPROCESS_AT_INPUT_SIZE`` (ours, off):
scores and masks at the input size, probabilities resized afterwards, detections with an empty
mask dropped.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from maskfrozen.modeling.inputs import normalized_image_batch
from maskfrozen.modeling.criterion import HungarianMatcher, QuerySet, SetCriterion
from maskfrozen.modeling.gt_masks import padded_gt_masks
from maskfrozen.modeling.postprocess import (boxes_from_masks, instances_to_output_size,
                                             mask_logits_at_output_size, mask_prob_score, top_query_class_pairs)
from maskfrozen.modeling.registries import PIXEL_DECODER_REGISTRY, TRANSFORMER_DECODER_REGISTRY, build_from_registry

from .interface import DecoderOutput, TrainingInputs, TransformerDecoderBase

__all__ = ["QuerySegmentor", "build_query_seg_criterion"]

Targets = List[Dict[str, torch.Tensor]]


def build_query_seg_criterion(cfg, decoder: Optional[TransformerDecoderBase] = None) -> SetCriterion:
    """Matcher (class / mask / dice costs, + the decoder's extra costs) and criterion from
    ``MODEL.MASK_FORMER``: lambda_cls, lambda_ce, lambda_dice, no-object weight, K points."""
    m = cfg.MODEL.MASK_FORMER
    extra = decoder.extra_matcher_costs() if decoder is not None else {}
    weights = {"class": m.CLASS_WEIGHT, "mask": m.MASK_WEIGHT, "dice": m.DICE_WEIGHT}
    weights.update({name: w for name, (w, _) in extra.items()})
    matcher = HungarianMatcher(weights, class_cost="softmax", num_mask_points=m.TRAIN_NUM_POINTS,
                               cost_fns={name: fn for name, (_, fn) in extra.items()})
    return SetCriterion(
        matcher, {"loss_class": m.CLASS_WEIGHT, "loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT},
        losses=("labels", "masks"), class_loss="softmax", eos_coef=m.NO_OBJECT_WEIGHT,
        num_points=m.TRAIN_NUM_POINTS, oversample_ratio=m.OVERSAMPLE_RATIO,
        importance_sample_ratio=m.IMPORTANCE_SAMPLE_RATIO)


def _check_supported(cfg) -> None:
    """Official keys accepted for yaml compatibility whose other values are not implemented."""
    m = cfg.MODEL.MASK_FORMER
    if m.TEST.SEMANTIC_ON or m.TEST.PANOPTIC_ON or not m.TEST.INSTANCE_ON:
        raise ValueError("QuerySegmentor: only instance segmentation is implemented "
                         "(MODEL.MASK_FORMER.TEST.INSTANCE_ON True, SEMANTIC_ON / PANOPTIC_ON False)")
    if m.ENC_LAYERS != 0 or m.TRANSFORMER_IN_FEATURE != "multi_scale_pixel_decoder":
        raise ValueError("QuerySegmentor: MODEL.MASK_FORMER.ENC_LAYERS must be 0 and TRANSFORMER_IN_FEATURE "
                         f"'multi_scale_pixel_decoder', got {m.ENC_LAYERS} / {m.TRANSFORMER_IN_FEATURE!r}")
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {cfg.TEST.DETECTIONS_PER_IMAGE}")


@META_ARCH_REGISTRY.register()
class QuerySegmentor(nn.Module):
    """Query-based instance segmenter (see module doc). Inputs are detectron2's batched dicts
    (``image`` CHW uint8, ``instances`` with ``gt_classes`` / ``gt_masks`` in training)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, transformer_decoder: TransformerDecoderBase,
                 criterion: SetCriterion, pixel_mean: List[float], pixel_std: List[float],
                 size_divisibility: int = 32, deep_supervision: bool = True, test_topk: int = 100,
                 mask_threshold: float = 0.5, postprocess_at_input_size: bool = False,
                 box_min_component_share: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.size_divisibility = size_divisibility
        self.deep_supervision = deep_supervision
        self.test_topk = test_topk
        self.mask_threshold = mask_threshold
        self.postprocess_at_input_size = postprocess_at_input_size
        self.box_min_component_share = box_min_component_share
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        _check_supported(cfg)
        backbone = build_backbone(cfg)
        pixel_decoder = build_from_registry(PIXEL_DECODER_REGISTRY, cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME,
                                            "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", cfg, backbone.output_shape())
        decoder = build_from_registry(TRANSFORMER_DECODER_REGISTRY, cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME,
                                      "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", cfg, pixel_decoder.output_spec())
        m = cfg.MODEL.MASK_FORMER
        return {
            "backbone": backbone, "pixel_decoder": pixel_decoder, "transformer_decoder": decoder,
            "criterion": build_query_seg_criterion(cfg, decoder),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": m.SIZE_DIVISIBILITY, "deep_supervision": m.DEEP_SUPERVISION,
            "test_topk": cfg.TEST.DETECTIONS_PER_IMAGE, "mask_threshold": m.TEST.MASK_THRESHOLD,
            "postprocess_at_input_size": m.TEST.POSTPROCESS_AT_INPUT_SIZE,
            "box_min_component_share": m.TEST.BOX_MIN_COMPONENT_SHARE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        pixels = self.pixel_decoder(self.backbone(images.tensor))
        if not self.training:
            return self.inference(self.transformer_decoder(pixels).outputs, batched_inputs, images)
        targets = self.prepare_targets(batched_inputs, images)
        decoded = self.transformer_decoder(pixels, TrainingInputs(targets, self.criterion.matcher))
        return self.losses(decoded, targets)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        return normalized_image_batch(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)

    # ------------------------------------------------------------------ training
    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> Targets:
        """Per image ``labels [T]`` and ``masks [T, H, W]`` bool over the padded image."""
        padded = tuple(images.tensor.shape[-2:])
        targets = []
        for x in batched_inputs:
            masks = padded_gt_masks(x, padded, self.device, type(self).__name__)  # also checks the instances
            targets.append({"labels": x["instances"].gt_classes.to(self.device).long(), "masks": masks})
        return targets

    def losses(self, decoded: DecoderOutput, targets: Targets) -> Dict[str, torch.Tensor]:
        """The main set (with its deep-supervision layers unless turned off), the decoder's
        extra sets through the one criterion, plus the decoder's extra losses."""
        main = dict(decoded.outputs)
        if not self.deep_supervision:
            main.pop("aux_outputs", None)
        losses = self.criterion([QuerySet(main), *decoded.extra_query_sets], targets)
        losses.update(decoded.extra_losses)
        return losses

    # ------------------------------------------------------------------ inference
    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        """Per image: top-k (query, class) pairs by p_class, then :meth:`instances_at_output_size`
        (official) or :meth:`instances_at_input_size` (ours, POSTPROCESS_AT_INPUT_SIZE). A query
        picked with several classes has its mask resized once."""
        padded = tuple(images.tensor.shape[-2:])
        results = []
        for logits, mask_logits, x, image_size in zip(outputs["pred_logits"], outputs["pred_masks"], batched_inputs,
                                                      images.image_sizes):
            query, label, score = top_query_class_pairs(logits.softmax(-1)[:, :-1], self.test_topk)
            unique, pair_to_unique = torch.unique(query, return_inverse=True)
            output_size = (x.get("height", image_size[0]), x.get("width", image_size[1]))
            finish = self.instances_at_input_size if self.postprocess_at_input_size else self.instances_at_output_size
            inst = finish(mask_logits[unique], pair_to_unique, label, score, padded, tuple(image_size), output_size)
            results.append({"instances": inst})
        return results

    def instances_at_output_size(self, mask_logits: torch.Tensor, pair_to_unique: torch.Tensor, labels: torch.Tensor,
                                 scores: torch.Tensor, padded, image_size, output_size) -> Instances:
        """The official post-processing: ``[U, h, w]`` mask logits of the picked queries resized
        to the output size first, then thresholded and scored there; every pair kept."""
        probs = mask_logits_at_output_size(mask_logits, padded, image_size, output_size).sigmoid()
        masks = probs > self.mask_threshold
        inst = Instances(output_size)
        inst.scores = scores * mask_prob_score(probs, self.mask_threshold)[pair_to_unique]
        inst.pred_classes = labels
        inst.pred_masks = masks[pair_to_unique]
        inst.pred_boxes = Boxes(boxes_from_masks(masks, self.box_min_component_share).tensor[pair_to_unique])
        return inst

    def instances_at_input_size(self, mask_logits: torch.Tensor, pair_to_unique: torch.Tensor, labels: torch.Tensor,
                                scores: torch.Tensor, padded, image_size, output_size) -> Instances:
        """Ours (POSTPROCESS_AT_INPUT_SIZE): scores, thresholds and boxes at the input size, the
        probabilities resized to the output size afterwards; empty masks dropped."""
        h, w = image_size
        probs = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
        probs = probs[0, :, :h, :w].sigmoid()
        inst = Instances((h, w))
        inst.scores = scores * mask_prob_score(probs, self.mask_threshold)[pair_to_unique]
        inst.pred_classes = labels
        boxes = boxes_from_masks(probs > self.mask_threshold, self.box_min_component_share)
        inst.pred_boxes = Boxes(boxes.tensor[pair_to_unique])
        inst.pred_mask_index = pair_to_unique
        return instances_to_output_size(inst, *output_size, self.mask_threshold, probs)
