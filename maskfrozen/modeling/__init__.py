"""Models: importing this package registers every meta-architecture."""
from . import detr  # noqa: F401,E402  (registers DeformableDETR)
from . import mask_frozen  # noqa: F401,E402  (registers MaskFrozenDETR)
