"""Custom operators: multi-scale deformable attention (compiled kernels + reference).

The compiled kernels are registered as ``torch.ops.maskfrozen.ms_deform_attn`` and
``torch.ops.maskfrozen.ms_deform_attn_backward`` (see :mod:`maskfrozen.ops.dispatch`).
"""
from .dispatch import BACKEND_ENV_VAR, BACKENDS, available_backends, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "available_backends", "BACKENDS", "BACKEND_ENV_VAR"]
