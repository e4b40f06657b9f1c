"""Building blocks shared by every model: the deformable attention module, attention and
FFN sub-layers, the deformable encoder, position encodings and box helpers."""
from .ms_deform_attn import MSDeformAttn  # noqa: F401
from .attention import CrossAttentionLayer, DeformableAttentionLayer, FFNLayer, SelfAttentionLayer  # noqa: F401
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, inverse_sigmoid  # noqa: F401
from .deformable_encoder import DeformableEncoder, EncoderOutput, LevelGeometry, flatten_levels  # noqa: F401
from .position_encoding import PositionEmbeddingSine, sine_embedding  # noqa: F401
from .transformer_blocks import MLP, gather_tokens, get_activation_fn  # noqa: F401
