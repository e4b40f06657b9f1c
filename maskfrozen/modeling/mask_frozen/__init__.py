"""Mask Frozen-DETR: a light trainable mask network on a frozen DETR detector."""
from .meta_arch import MaskFrozenDETR, build_frozen_detector, load_detector_weights  # noqa: F401
from .mask_network import MaskNetwork, MaskPredictions  # noqa: F401
from .mask_region import BoxMaskRegion, ImageMaskRegion  # noqa: F401
