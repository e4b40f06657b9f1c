"""Query-based instance segmentation: the ``QuerySegmentor`` meta-architecture and its
pluggable pixel / transformer decoders (Mask2Former in ``mask2former/``, FastInst in ``fastinst/``)."""
from .interface import (  # noqa: F401
    DecoderOutput, PixelDecoderOutput, PixelDecoderSpec, TrainingInputs, TransformerDecoderBase)
from .meta_arch import QuerySegmentor, build_query_seg_criterion  # noqa: F401
from . import mask2former  # noqa: F401,E402  (registers MSDeformAttnPixelDecoder, MultiScaleMaskedTransformerDecoder)
from . import fastinst  # noqa: F401,E402  (registers PyramidPoolingModuleFPN, FastInstDecoder)
