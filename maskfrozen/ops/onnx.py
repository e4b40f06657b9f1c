"""ONNX translations of ``torch.ops.maskfrozen.ms_deform_attn`` for ``torch.onnx.export``.

``torch.export`` records the op as one opaque node (its ``torch.library`` registration);
``torch.onnx.export(..., custom_translation_table=onnx_translation_table())`` then writes it as

* standard ONNX operators (default): the reference's decomposition, one ``GridSample``
  (bilinear, zero padding, ``align_corners=0``; opset >= 16) per feature level and the
  attention-weighted sum (per level, then over levels). Any ONNX runtime runs it, no plugin. The level geometry
  (``spatial_shapes``, ``level_start_index``) stays a graph value, so image height and
  width stay dynamic; the number of levels, heads, points and the head width are static.
* one custom-domain node ``maskfrozen.MultiScaleDeformableAttention`` (``custom_domain=True``)
  with the op's five inputs and its output, for runtimes that ship a fused kernel (e.g. a
  TensorRT plugin). ONNX Runtime does not run that node unless such a kernel is registered.

Needs the optional ``onnxscript`` package (``pip install .[export]``); importing this module
without it raises an ImportError that says so.
"""
from typing import Callable, Dict

import torch

try:
    from onnxscript import opset18 as op
    from onnxscript.values import Opset
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "maskfrozen.ops.onnx needs onnxscript (and onnx): pip install 'maskfrozen[export]' "
        f"or pip install onnx onnxscript onnxruntime ({e})"
    ) from e

from . import dispatch  # noqa: F401  (registers torch.ops.maskfrozen.ms_deform_attn)

__all__ = ["CUSTOM_DOMAIN", "CUSTOM_OP_NAME", "ms_deform_attn_onnx", "ms_deform_attn_onnx_custom",
           "onnx_translation_table"]

CUSTOM_DOMAIN = "maskfrozen"
CUSTOM_OP_NAME = "MultiScaleDeformableAttention"


def _register_custom_schema() -> None:
    """The ONNX schema of the custom-domain node (inputs and output as the op's), registered
    once so that onnxscript can build the node and ``onnx.checker`` accepts it."""
    import onnx

    if onnx.defs.has(CUSTOM_OP_NAME, CUSTOM_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        CUSTOM_OP_NAME, CUSTOM_DOMAIN, 1,
        doc="Multi-scale deformable attention (Deformable-DETR eq. 3): maskfrozen.ops.ms_deform_attn",
        inputs=[param("value", "T"), param("spatial_shapes", "I"), param("level_start_index", "I"),
                param("sampling_locations", "T"), param("attention_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(double)", "tensor(float16)"], "floating point"),
                          ("I", ["tensor(int64)"], "level geometry")])
    onnx.defs.register_schema(schema)


_register_custom_schema()
_custom_opset = Opset(CUSTOM_DOMAIN, 1)


def _static_dims(x, dims, name: str):
    """The static sizes of ``x`` at ``dims`` (an error naming the input when one is dynamic)."""
    shape = x.shape
    sizes = []
    for d in dims:
        size = None if shape is None else shape[d]
        if not isinstance(size, int):
            raise ValueError(f"ms_deform_attn ONNX export: dimension {d} of {name} must be static, got {size!r} "
                             f"(shape {shape})")
        sizes.append(size)
    return sizes


def ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op as standard ONNX operators (module doc); shapes as in
    :func:`maskfrozen.ops.ms_deform_attn`. Static: heads M, head width D, levels L, points P.

    Per level: ``GridSample`` of the level's values at its ``P x Lq`` locations (points as
    rows: ``[N*M, D, P, Lq]``), times the attention weights, summed over the points; the
    levels are added up. (One concatenated ``[N*M, D, Lq, L*P]`` tensor, as the reference
    builds it, took ~35% longer in ONNX Runtime: it copies the largest tensor twice.)"""
    num_heads, head_dim = _static_dims(value, (2, 3), "value")
    num_levels, num_points = _static_dims(sampling_locations, (3, 4), "sampling_locations")
    batch = op.Shape(value, start=0, end=1)
    num_values = op.Shape(value, start=1, end=2)
    num_queries = op.Shape(sampling_locations, start=1, end=2)
    # value [N, S, M, D] -> [N*M, D, S]
    values = op.Reshape(op.Transpose(value, perm=[0, 2, 3, 1]), op.Concat(op.Constant(value_ints=[-1, head_dim]),
                                                                         num_values, axis=0))
    # locations [N, Lq, M, L, P, 2] in [0, 1] -> grids [N*M, L, P, Lq, 2] in [-1, 1]
    grids = op.Transpose(sampling_locations, perm=[0, 2, 3, 4, 1, 5])
    grids = op.Reshape(grids, op.Concat(op.Constant(value_ints=[-1, num_levels, num_points]), num_queries,
                                        op.Constant(value_ints=[2]), axis=0))
    two = op.CastLike(op.Constant(value_float=2.0), grids)
    one = op.CastLike(op.Constant(value_float=1.0), grids)
    grids = op.Sub(op.Mul(grids, two), one)
    # weights [N, Lq, M, L, P] -> [N*M, L, 1, P, Lq]
    weights = op.Transpose(attention_weights, perm=[0, 2, 3, 4, 1])
    weights = op.Reshape(weights, op.Concat(op.Constant(value_ints=[-1, num_levels, 1, num_points]), num_queries,
                                            axis=0))
    out = None
    for level in range(num_levels):
        size = op.Gather(spatial_shapes, op.Constant(value_int=level), axis=0)  # [2] (H, W)
        start = op.Slice(level_start_index, [level], [level + 1])  # [1]
        end = op.Add(start, op.ReduceProd(size, keepdims=1))
        level_values = op.Slice(values, start, end, [2])  # [N*M, D, H*W]
        level_values = op.Reshape(level_values, op.Concat(op.Constant(value_ints=[-1, head_dim]), size, axis=0))
        level_grid = op.Gather(grids, op.Constant(value_int=level), axis=1)  # [N*M, P, Lq, 2]
        sampled = op.GridSample(level_values, level_grid, align_corners=0, mode="bilinear",
                                padding_mode="zeros")  # [N*M, D, P, Lq]
        level_weights = op.Gather(weights, op.Constant(value_int=level), axis=1)  # [N*M, 1, P, Lq]
        level_out = op.ReduceSum(op.Mul(sampled, level_weights), op.Constant(value_ints=[2]), keepdims=0)
        out = level_out if out is None else op.Add(out, level_out)  # [N*M, D, Lq]
    out = op.Reshape(out, op.Concat(batch, op.Constant(value_ints=[num_heads * head_dim, -1]), axis=0))
    return op.Transpose(out, perm=[0, 2, 1])  # [N, Lq, M*D]


def ms_deform_attn_onnx_custom(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op as one ``maskfrozen.MultiScaleDeformableAttention`` node (same inputs and output)."""
    return _custom_opset.MultiScaleDeformableAttention(value, spatial_shapes, level_start_index, sampling_locations,
                                                       attention_weights)


def onnx_translation_table(custom_domain: bool = False) -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: the op as standard operators, or
    (``custom_domain``) as one custom-domain node."""
    fn = ms_deform_attn_onnx_custom if custom_domain else ms_deform_attn_onnx
    return {torch.ops.maskfrozen.ms_deform_attn.default: fn}
