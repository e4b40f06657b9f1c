"""``build_resnet_any_width_fpn_backbone``: Detectron2's FPN (P2-P6 via LastLevelMaxPool) on
``build_resnet_any_width_backbone``, so that the shapes configs can use a narrow ResNet-18
under the same FPN as ``build_resnet_fpn_backbone`` (COCO configs use Detectron2's builder)."""
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from maskfrozen.modeling.backbone import build_resnet_any_width_backbone

__all__ = ["build_resnet_any_width_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_resnet_any_width_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """FPN(``MODEL.FPN``) with a max-pooled P6 on the any-width ResNet (``MODEL.RESNETS``)."""
    bottom_up = build_resnet_any_width_backbone(cfg, input_shape)
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
