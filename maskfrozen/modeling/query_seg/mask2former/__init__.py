"""Mask2Former's parts, registered by name: ``MSDeformAttnPixelDecoder`` (pixel decoder) and
``MultiScaleMaskedTransformerDecoder`` (transformer decoder)."""
from .pixel_decoder import MSDeformAttnPixelDecoder  # noqa: F401
from .transformer_decoder import MultiScaleMaskedTransformerDecoder, attention_mask_from_masks  # noqa: F401
