"""SOTR (Guo et al., ICCV 2021): twin-attention transformer + dynamic-kernel masks on a
ResNet-FPN; importing registers the ``SOTR`` meta-architecture and the any-width FPN backbone."""
from .backbone import build_resnet_any_width_fpn_backbone  # noqa: F401
from .head import MaskBranch, SOTRHead, dynamic_conv  # noqa: F401
from .inference import matrix_nms, point_nms  # noqa: F401
from .meta_arch import SOTR  # noqa: F401
from .targets import SOTRLoss, gt_mask_targets, solo_level_targets  # noqa: F401
from .twin_attention import AxialAttention, TwinTransformer, TwinTransformerLayer  # noqa: F401
