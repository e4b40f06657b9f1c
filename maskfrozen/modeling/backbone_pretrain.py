"""``BackbonePretrainer``: the detectors' backbone pretrained by classifying object crops of a
detection dataset (the shapes' analogue of ImageNet pretraining, ``tools/pretrain_backbone.py``).

The backbone is built exactly as the detection configs build it (``build_backbone`` from
``MODEL.BACKBONE`` / ``MODEL.RESNETS``; of an FPN backbone only its ResNet ``bottom_up`` is kept),
so its state_dict is the detectors' ``backbone.*`` (or ``backbone.bottom_up.*``) one. As an
ImageNet classifier does, it classifies each crop (``maskfrozen.data.crops``) from its
globally average-pooled features, one linear classifier per level of
``BACKBONE_PRETRAIN.IN_FEATURES`` (softmax cross-entropy averaged over the levels). At inference
it returns each crop's logits per level and its label.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from maskfrozen.data.datasets import dataset_num_classes
from maskfrozen.engine.weights import resnet_of_backbone
from maskfrozen.modeling.inputs import normalized_image_batch

__all__ = ["add_backbone_pretrain_config", "BackbonePretrainer"]


def add_backbone_pretrain_config(cfg: CN) -> None:
    """``BACKBONE_PRETRAIN``: the pretraining task's keys (defaults = configs/shapes/pretrain/R18_half.yaml)."""
    cfg.BACKBONE_PRETRAIN = CN()
    p = cfg.BACKBONE_PRETRAIN
    p.IN_FEATURES = ["res5"]  # ResNet levels classified after global average pooling (one linear layer each)
    p.CROP_SIZE = 64  # pixels of a crop's side
    p.CROP_CONTEXT = 1.3  # crop side / the longer side of the object's box
    p.SCALE_JITTER = 0.15  # training: side x exp(U(-j, j))
    p.SHIFT_JITTER = 0.1  # training: centre + U(-j, j) x side on each axis
    # where tools/pretrain_backbone.py writes the backbone-only checkpoint (MODEL.WEIGHTS of the recipes)
    p.OUTPUT = "output/pretrained/shapes_R18_half.pth"


@META_ARCH_REGISTRY.register()
class BackbonePretrainer(nn.Module):
    """Crop classification from globally pooled backbone features (see the module docstring).

    Inputs: dicts with ``image`` (CHW uint8 crop) and ``label``. Training returns
    ``{"loss_cls_<level>": CE / num_levels}``; inference, per crop, ``{"logits": {level: [K]}, "label": int}``."""

    @configurable
    def __init__(self, *, backbone: nn.Module, in_features: List[str], num_classes: int,
                 pixel_mean: List[float], pixel_std: List[float]):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        unknown = [f for f in in_features if f not in shapes]
        if unknown:
            raise ValueError(f"BACKBONE_PRETRAIN.IN_FEATURES {unknown} are not outputs of the backbone "
                             f"(MODEL.RESNETS.OUT_FEATURES: {sorted(shapes)})")
        self.in_features = list(in_features)
        self.classifiers = nn.ModuleDict({f: nn.Linear(shapes[f].channels, num_classes) for f in in_features})
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> Dict:
        found = dataset_num_classes(cfg.DATASETS.TRAIN or cfg.DATASETS.TEST)
        if found is None:
            raise ValueError(f"BackbonePretrainer: no class list known for the datasets {list(cfg.DATASETS.TRAIN)}")
        _, resnet = resnet_of_backbone(build_backbone(cfg))  # of an FPN backbone (SOTR), its bottom_up
        return {"backbone": resnet, "in_features": cfg.BACKBONE_PRETRAIN.IN_FEATURES, "num_classes": found[0],
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD}

    def forward(self, batched_inputs: List[Dict]):
        images = normalized_image_batch(batched_inputs, self.pixel_mean, self.pixel_std, 0).tensor
        features = self.backbone(images)
        logits = {f: self.classifiers[f](features[f].mean((2, 3))) for f in self.in_features}
        labels = torch.as_tensor([x["label"] for x in batched_inputs], device=images.device)
        if self.training:
            return {f"loss_cls_{f}": F.cross_entropy(v, labels) / len(self.in_features) for f, v in logits.items()}
        return [{"logits": {f: v[i] for f, v in logits.items()}, "label": int(labels[i])}
                for i in range(len(batched_inputs))]
