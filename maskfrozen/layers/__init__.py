from .ms_deform_attn import MSDeformAttn  # noqa: F401
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, inverse_sigmoid  # noqa: F401
from .position_encoding import PositionEmbeddingSine, sine_embedding  # noqa: F401
from .transformer_blocks import FFN, MLP, get_activation_fn  # noqa: F401
