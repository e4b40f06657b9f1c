"""Converters from public checkpoints to maskfrozen parameter names."""
from .detr_converter import (  # noqa: F401
    KEY_TABLES, ConversionCoverageError, ConversionReport, coco_contiguous_ids, convert_detr_state_dict)
from .loading import CheckpointFormatError, load_model_tensors  # noqa: F401
from .co_detr_converter import CoDETRConversionReport, convert_co_detr_state_dict  # noqa: F401
from .mask2former_converter import convert_mask2former_state_dict, load_mask2former_checkpoint  # noqa: F401
from .fastinst_converter import convert_fastinst_state_dict  # noqa: F401
from .sotr_converter import convert_sotr_state_dict  # noqa: F401
from .formats import FORMATS, CheckpointFormat, WrongCheckpointFormatError, register_format  # noqa: F401
