"""Converters from public checkpoints to maskfrozen parameter names."""
from .detr_converter import ConversionReport, KEY_TABLES, coco_contiguous_ids, convert_detr_state_dict  # noqa: F401
