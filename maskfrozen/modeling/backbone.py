"""``build_resnet_any_width_backbone``: Detectron2's ResNet with the width honoured for R18/R34.

Detectron2's ``build_resnet_backbone`` insists on ``RES2_OUT_CHANNELS = 64`` for the
basic-block depths (18, 34). The small CPU configs train from random initialisation,
where a narrower ResNet-18 (e.g. 32 channels: ~3.6x cheaper forward + backward at
256 px) buys many more iterations in the same time. Same classes (``BasicStem``,
``BasicBlock``, ``ResNet``), hence the same parameter names as Detectron2's R18/R34;
bottleneck depths (50+) are built by Detectron2's own builder unchanged.
"""
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

__all__ = ["build_resnet_any_width_backbone"]

BASIC_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@BACKBONE_REGISTRY.register()
def build_resnet_any_width_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """ResNet from ``MODEL.RESNETS``; for depth 18/34 the stem has ``STEM_OUT_CHANNELS``
    and res2 ``RES2_OUT_CHANNELS`` channels (doubling per stage) instead of fixed 64."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BASIC_BLOCKS_PER_STAGE:
        return build_resnet_backbone(cfg, input_shape)
    if r.NUM_GROUPS != 1 or r.RES5_DILATION != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(f"MODEL.RESNETS: depth {r.DEPTH} (basic blocks) needs NUM_GROUPS=1, RES5_DILATION=1 and no "
                         f"DEFORM_ON_PER_STAGE; got {r.NUM_GROUPS}, {r.RES5_DILATION}, {list(r.DEFORM_ON_PER_STAGE)}")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for index, num_blocks in enumerate(BASIC_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if index == 0 else 2
        stages.append(ResNet.make_stage(block_class=BasicBlock, num_blocks=num_blocks,
                                        stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                                        in_channels=in_channels, out_channels=out_channels, norm=r.NORM))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
