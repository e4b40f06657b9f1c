"""Custom operators: multi-scale deformable attention (compiled kernels + reference)."""
from .dispatch import BACKEND_ENV_VAR, BACKENDS, available_backends, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "available_backends", "BACKENDS", "BACKEND_ENV_VAR"]
