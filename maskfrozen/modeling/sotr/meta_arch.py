"""``SOTR``: Segmenting Objects with Transformers (Guo et al., ICCV 2021), a Detectron2
meta-architecture on a ResNet-FPN backbone (P2-P6).

Forward: FPN -> each instance level resampled to its stride (P2 halved, P6 to P5's size) and
resized to its ``N x N`` grid -> the shared twin transformer -> class logits ``[N, N, K]`` and
kernels ``[N, N, D]`` per level. The mask branch sums conv+GN+ReLU(+upsample) maps of FPN
P2-P4 and of the transformer-refined full-resolution P5 at 1/4 scale -> mask feature ``F``
(``D`` channels); a cell's mask is its kernel convolved with ``F`` (:func:`dynamic_conv`).
Training: SOLO targets, focal + dice (:class:`SOTRLoss`). Inference: point NMS, score and
area thresholds, maskness, Matrix NMS, top ``TEST.DETECTIONS_PER_IMAGE``; the mask
probabilities upsampled (official ratio ``ceil(h / f_h)``), cropped to the image, resized to the
output size and thresholded; boxes from the masks (ours: the official code leaves ``pred_boxes``
zero, COCOEvaluator's bbox AP needs them). Defaults = the official code (docs/fidelity/sotr.md).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from torch import nn

from maskfrozen.modeling.inputs import normalized_image_batch
from maskfrozen.modeling.gt_masks import padded_gt_masks
from maskfrozen.modeling.postprocess import boxes_from_masks

from .head import MaskBranch, SOTRHead, level_features
from .inference import SOTRInferenceConfig, flatten_levels, point_nms, select_instances
from .targets import SOTRLoss
from .twin_attention import TwinTransformer

__all__ = ["SOTR", "build_sotr_parts"]


def _check_config(cfg: CfgNode, shapes: Dict) -> None:
    s = cfg.MODEL.SOTR
    n = len(s.INSTANCE_IN_FEATURES)
    if len(s.NUM_GRIDS) != n or not all(isinstance(g, int) and g > 0 for g in s.NUM_GRIDS):
        raise ValueError(f"MODEL.SOTR.NUM_GRIDS={list(s.NUM_GRIDS)} must hold one positive integer grid size per level "
                         f"of MODEL.SOTR.INSTANCE_IN_FEATURES ({n} levels: {list(s.INSTANCE_IN_FEATURES)})")
    if not (len(s.FPN_INSTANCE_STRIDES) == len(s.NUM_GRIDS) == len(s.FPN_SCALE_RANGES) == n):
        raise ValueError(f"MODEL.SOTR: INSTANCE_IN_FEATURES ({n}), FPN_INSTANCE_STRIDES ({len(s.FPN_INSTANCE_STRIDES)}), "
                         f"NUM_GRIDS ({len(s.NUM_GRIDS)}) and FPN_SCALE_RANGES ({len(s.FPN_SCALE_RANGES)}) need one entry per level")
    missing = [f for f in list(s.INSTANCE_IN_FEATURES) + list(s.MASK_IN_FEATURES) if f not in shapes]
    if missing:
        raise ValueError(f"MODEL.SOTR: features {missing} are not backbone outputs {sorted(shapes)}")
    channels = {shapes[f].channels for f in list(s.INSTANCE_IN_FEATURES) + list(s.MASK_IN_FEATURES)}
    if channels != {s.DIM}:
        raise ValueError(f"MODEL.SOTR.DIM={s.DIM} must equal the backbone feature channels {sorted(channels)} "
                         f"(MODEL.FPN.OUT_CHANNELS): the twin transformer reads the FPN levels directly")


def build_sotr_parts(cfg: CfgNode, backbone: Backbone) -> Dict:
    """Head (twin transformer + class/kernel heads), mask branch and loss of ``MODEL.SOTR``."""
    s = cfg.MODEL.SOTR
    _check_config(cfg, backbone.output_shape())
    transformer = TwinTransformer(s.DIM, s.DEPTH, s.NUM_HEADS, s.TWIN_MODE, s.LAYER, s.POS_EMBED, max(s.NUM_GRIDS),
                                  s.TWIN_NORM, s.GATE, s.DROPOUT, s.WIDTH_DOUBLING, s.CONV_BRANCHES, s.QKV_BIAS)
    head = SOTRHead(transformer, s.DIM, s.NUM_CLASSES, s.NUM_KERNELS, s.NUM_GRIDS, s.PRIOR_PROB)
    mask_branch = MaskBranch(len(s.MASK_IN_FEATURES), s.DIM, s.MASK_CHANNELS, s.NUM_KERNELS, s.GN_GROUPS)
    loss = SOTRLoss(s.NUM_CLASSES, s.NUM_GRIDS, [tuple(r) for r in s.FPN_SCALE_RANGES], s.SIGMA, s.FOCAL_ALPHA,
                    s.FOCAL_GAMMA, s.FOCAL_WEIGHT, s.DICE_WEIGHT, s.TARGET_CENTRES, s.GT_MASK_RESIZE, s.DICE)
    t = s.TEST
    inference = SOTRInferenceConfig(t.SCORE_THR, t.MASK_THR, t.NMS_PRE, t.UPDATE_THR, cfg.TEST.DETECTIONS_PER_IMAGE,
                                    t.NMS_KERNEL, t.NMS_SIGMA, t.EXACT_UPSAMPLE, t.BOX_MIN_COMPONENT_SHARE)
    return {"head": head, "mask_branch": mask_branch, "loss": loss, "inference_cfg": inference}


@META_ARCH_REGISTRY.register()
class SOTR(nn.Module):
    """SOTR (module doc). Outputs ``instances`` with ``pred_masks``, ``pred_boxes``,
    ``scores``, ``pred_classes`` at each input's ``height x width``."""

    @configurable
    def __init__(self, *, backbone: Backbone, head: SOTRHead, mask_branch: MaskBranch, loss: SOTRLoss,
                 instance_features: Sequence[str], instance_strides: Sequence[int], mask_features: Sequence[str],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int = 32,
                 inference_cfg: SOTRInferenceConfig = SOTRInferenceConfig()):
        super().__init__()
        self.backbone, self.head, self.mask_branch, self.loss = backbone, head, mask_branch, loss
        self.instance_features, self.instance_strides = list(instance_features), list(instance_strides)
        self.mask_features = list(mask_features)
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.inference_cfg = inference_cfg
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        backbone = build_backbone(cfg)
        s = cfg.MODEL.SOTR
        return {"backbone": backbone, **build_sotr_parts(cfg, backbone),
                "instance_features": s.INSTANCE_IN_FEATURES, "instance_strides": s.FPN_INSTANCE_STRIDES,
                "mask_features": s.MASK_IN_FEATURES, "pixel_mean": cfg.MODEL.PIXEL_MEAN,
                "pixel_std": cfg.MODEL.PIXEL_STD, "size_divisibility": s.SIZE_DIVISIBILITY}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        logits, kernels, mask_feature = self.predict(images)
        if self.training:
            return self.loss(logits, kernels, mask_feature, self.prepare_targets(batched_inputs, images))
        return self.inference(logits, kernels, mask_feature, batched_inputs, images)

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        return normalized_image_batch(batched_inputs, self.pixel_mean, self.pixel_std, self.size_divisibility)

    def predict(self, images: ImageList):
        """-> (class logits ``[B, N, N, K]`` and kernels ``[B, N, N, D]`` per level, ``F [B, D, H/4, W/4]``)."""
        features = self.backbone(images.tensor)
        strides = {k: v.stride for k, v in self.backbone.output_shape().items()}
        levels = level_features(features, self.instance_features, self.instance_strides, strides)
        logits, kernels = self.head(levels)
        mask_inputs = [features[f] for f in self.mask_features[:-1]]
        mask_inputs.append(self.head.transformer(features[self.mask_features[-1]]))  # transformer-refined P5
        return logits, kernels, self.mask_branch(mask_inputs)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Boxes (XYXY input pixels), labels and bool masks over each (unpadded) image."""
        targets = []
        for x, size in zip(batched_inputs, images.image_sizes):
            masks = padded_gt_masks(x, tuple(size), self.device, type(self).__name__)  # also checks the instances
            inst = x["instances"].to(self.device)
            targets.append({"boxes": inst.gt_boxes.tensor, "labels": inst.gt_classes, "masks": masks})
        return targets

    def cell_strides(self) -> torch.Tensor:
        """``[sum_l N_l^2]`` instance stride of every cell (the minimum mask area kept)."""
        return torch.cat([torch.full((n * n,), float(s), device=self.device)
                          for n, s in zip(self.head.num_grids, self.instance_strides)])

    def inference(self, logits, kernels, mask_feature: torch.Tensor, batched_inputs: List[Dict],
                  images: ImageList) -> List[Dict]:
        scores = [point_nms(x.sigmoid().permute(0, 3, 1, 2)).permute(0, 2, 3, 1) for x in logits]
        strides = self.cell_strides()
        mask_stride = images.tensor.shape[-2] // mask_feature.shape[-2]
        results = []
        for b, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            sel = select_instances(flatten_levels(scores, b), flatten_levels(kernels, b), strides, mask_feature[b],
                                   self.inference_cfg)
            out_size = (x.get("height", h), x.get("width", w))
            masks = self.masks_at_output_size(sel.mask_probs, (h, w), out_size, mask_stride)
            inst = Instances(out_size, scores=sel.scores, pred_classes=sel.labels, pred_masks=masks)
            inst.pred_boxes = boxes_from_masks(masks, self.inference_cfg.box_min_component_share)
            results.append({"instances": inst})
        return results

    def masks_at_output_size(self, mask_probs: torch.Tensor, image_size: Tuple[int, int], output_size: Tuple[int, int],
                             mask_stride: int) -> torch.Tensor:
        """``[n, f_h, f_w]`` mask probabilities over the padded batch at 1/``mask_stride`` ->
        ``[n, H_out, W_out]`` bool: upsampled by ``r`` (official ``ceil(h / f_h)``; with
        ``TEST.EXACT_UPSAMPLE`` the mask stride), cropped to the image ``h x w``, resized to the
        output size, thresholded."""
        if len(mask_probs) == 0:
            return torch.zeros((0, *output_size), dtype=torch.bool, device=mask_probs.device)
        (h, w), (f_h, f_w) = image_size, mask_probs.shape[-2:]
        ratio = mask_stride if self.inference_cfg.exact_upsample else math.ceil(h / f_h)
        probs = F.interpolate(mask_probs[None], size=(f_h * ratio, f_w * ratio), mode="bilinear", align_corners=False)
        probs = F.interpolate(probs[:, :, :h, :w], size=tuple(output_size), mode="bilinear", align_corners=False)[0]
        return probs > self.inference_cfg.mask_threshold
