"""Co-DETR: training-only auxiliary heads with one-to-many assignment on the encoder output
of any DETR-family detector, and their positive samples as extra decoder query groups.
Importing this package registers it as the DETR extension ``co_detr``."""
from .adapter import MultiScaleAdapter  # noqa: F401
from .atss import ATSSHead, AuxPositives, atss_assign, centerness_target  # noqa: F401
from .co_detr import AUX_HEAD_BUILDERS, CoDETR, build_co_detr, check_aux_heads, register_aux_head  # noqa: F401
from .positive_queries import PositiveQueryEmbedding, batch_positives, positive_query_sets  # noqa: F401
from .rcnn import FasterRCNNAuxHead, rpn_anchor_sizes  # noqa: F401
