"""ONNX translations that keep image sizes dynamic where the exporter's default would not.

``torch.onnx.export`` decomposes ``aten.adaptive_avg_pool2d`` (FastInst's pyramid pooling
module: output sizes 1, 2, 3, 6) into gathers whose indices are computed for the traced input
size: the ONNX graph then fails (or reads wrong cells) at any other size, and nothing warns
at export time. Here it becomes two matrix products with averaging matrices built from the
input's runtime shape: ``out = A_H x A_W^T`` with ``A_n[i, j] = 1 / (e_i - s_i)`` for
``s_i <= j < e_i``, ``s_i = floor(i n / o)``, ``e_i = ceil((i + 1) n / o)``: PyTorch's windows.
"""
from typing import Callable, Dict

import torch
from onnxscript import opset18 as op

__all__ = ["adaptive_avg_pool2d_onnx", "translation_table"]


def _averaging_matrix(size, out_size: int, like):
    """``[out_size, size]`` averaging matrix of adaptive pooling along one axis (``size``: a
    1-element int64 graph value)."""
    n = op.Squeeze(size)
    rows = op.Range(op.Constant(value_int=0), op.Constant(value_int=out_size), op.Constant(value_int=1))
    o = op.Constant(value_int=out_size)
    starts = op.Div(op.Mul(rows, n), o)  # floor(i n / o) (non-negative integers)
    ends = op.Div(op.Sub(op.Add(op.Mul(op.Add(rows, op.Constant(value_int=1)), n), o), op.Constant(value_int=1)), o)
    cols = op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))
    starts, ends = op.Unsqueeze(starts, [1]), op.Unsqueeze(ends, [1])
    inside = op.And(op.GreaterOrEqual(cols, starts), op.Less(cols, ends))
    weights = op.Div(op.CastLike(inside, like), op.CastLike(op.Sub(ends, starts), like))
    return weights  # [out_size, size]


def adaptive_avg_pool2d_onnx(x, output_size):
    """``aten.adaptive_avg_pool2d(x [N, C, H, W], (o_h, o_w))`` for any runtime H, W."""
    out_h, out_w = (int(s) for s in output_size)
    rows = _averaging_matrix(op.Shape(x, start=-2, end=-1), out_h, x)  # [o_h, H]
    cols = _averaging_matrix(op.Shape(x, start=-1), out_w, x)  # [o_w, W]
    return op.MatMul(op.MatMul(rows, x), op.Transpose(cols, perm=[1, 0]))


def translation_table(custom_domain: bool = False) -> Dict[Callable, Callable]:
    """The deformable-attention op (:func:`maskfrozen.ops.onnx.onnx_translation_table`) and the
    translations of this module, for ``torch.onnx.export(custom_translation_table=...)``."""
    from maskfrozen.ops.onnx import onnx_translation_table

    return {**onnx_translation_table(custom_domain),
            torch.ops.aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d_onnx}
