"""One Detectron2 registry per pluggable model part, each chosen by a config name.

=================================  ===========================================  =========================
registry                           config key                                   entries
=================================  ===========================================  =========================
``IMAGE_ENCODER_REGISTRY``         ``MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME``     none, deformable, swin, convnext
``BOX_ENCODER_REGISTRY``           ``MODEL.MASK_FROZEN.BOX_ENCODER.NAME``       none, transformer
``MASK_REGION_REGISTRY``           ``MODEL.MASK_FROZEN.MASK_REGION``            box, image
``PIXEL_DECODER_REGISTRY``         pixel decoders of the query-based mask meta-architecture
``TRANSFORMER_DECODER_REGISTRY``   transformer decoders of the query-based mask meta-architecture
=================================  ===========================================  =========================

Every entry is a class whose ``@configurable`` constructor accepts a cfg (plus the
arguments its builder documents), as Detectron2's own heads do. Entries are registered
under their class name; a class may also carry a short ``config_name`` (e.g. "deformable")
that configs use instead.
"""
from detectron2.utils.registry import Registry

__all__ = [
    "IMAGE_ENCODER_REGISTRY",
    "BOX_ENCODER_REGISTRY",
    "MASK_REGION_REGISTRY",
    "PIXEL_DECODER_REGISTRY",
    "TRANSFORMER_DECODER_REGISTRY",
    "build_from_registry",
    "lookup",
]

IMAGE_ENCODER_REGISTRY = Registry("IMAGE_ENCODER")
IMAGE_ENCODER_REGISTRY.__doc__ = "Mask Frozen-DETR image feature encoders F_e: (cfg, dim, num_levels) -> module."
BOX_ENCODER_REGISTRY = Registry("BOX_ENCODER")
BOX_ENCODER_REGISTRY.__doc__ = "Mask Frozen-DETR box feature encoders F_b: (cfg, in_dim) -> module with out_channels."
MASK_REGION_REGISTRY = Registry("MASK_REGION")
MASK_REGION_REGISTRY.__doc__ = "Where Mask Frozen-DETR predicts a mask (inside its box or over the image): (cfg, c1_stride)."
PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Pixel decoders of the query-based mask meta-architecture: (cfg, input_shape)."
TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Transformer decoders of the query-based mask meta-architecture: (cfg, ...)."


def lookup(registry: Registry, name: str, key: str):
    """The entry registered as ``name`` or whose ``config_name`` is ``name``; an error
    naming the config ``key`` and the known names otherwise."""
    if name in registry:
        return registry.get(name)
    by_config_name = {getattr(obj, "config_name", None): obj for _, obj in registry}
    if name in by_config_name:
        return by_config_name[name]
    known = sorted({k for k, _ in registry} | {n for n in by_config_name if n})
    raise ValueError(f"{key}={name!r} is not a registered name; known: {known}")


def build_from_registry(registry: Registry, name: str, key: str, *args, **kwargs):
    """``lookup(registry, name, key)(*args, **kwargs)``."""
    return lookup(registry, name, key)(*args, **kwargs)
