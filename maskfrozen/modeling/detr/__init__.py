"""DETR detectors (Deformable-DETR, DINO, H-DETR) as one Detectron2 meta-architecture."""
from .denoising import ContrastiveDenoising, DenoisingQueries  # noqa: F401
from .meta_arch import DeformableDETR, DeformableDETRFamily, DetectorOutputs  # noqa: F401
from .neck import ChannelMapper  # noqa: F401
from .query_groups import query_self_attention_mask, query_slices  # noqa: F401
from .transformer import DecoderOutput, DecoderQueries, DeformableTransformer, DeformableTransformerOutput  # noqa: F401
