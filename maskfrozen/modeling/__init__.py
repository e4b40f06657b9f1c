"""Models: importing this package registers every meta-architecture."""
from . import backbone  # noqa: F401,E402  (registers build_resnet_any_width_backbone)
from . import detr  # noqa: F401,E402  (registers DeformableDETRFamily and its alias DeformableDETR)
from . import co_detr  # noqa: F401,E402  (registers the "co_detr" DETR extension, MODEL.CO_DETR)
from . import mask_frozen  # noqa: F401,E402  (registers MaskFrozenDETR)
from . import query_seg  # noqa: F401,E402  (registers QuerySegmentor and the Mask2Former decoders)
from . import sotr  # noqa: F401,E402  (registers SOTR and build_resnet_any_width_fpn_backbone)
