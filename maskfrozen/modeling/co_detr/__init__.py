"""Co-DETR: training-only auxiliary heads with one-to-many assignment on the encoder output
of any DETR-family detector, and their positive samples as extra decoder query groups."""
from .adapter import MultiScaleAdapter  # noqa: F401
from .atss import ATSSHead, AuxPositives, atss_assign, centerness_target  # noqa: F401
from .co_detr import AUX_HEAD_TYPES, CoDETR, build_co_detr  # noqa: F401
from .positive_queries import PositiveQueryEmbedding, batch_positives, positive_query_sets  # noqa: F401
from .rcnn import FasterRCNNAuxHead, rpn_anchor_sizes  # noqa: F401
