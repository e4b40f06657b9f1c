"""The twin transformer of SOTR (Guo et al., ICCV 2021, Sec. 3.2).

Twin attention: a grid ``P in R^{C x H x W}`` is attended within each column (the ``H`` cells
of one column attend to each other) and within each row, ``O(H W^2 + H^2 W)`` instead of
``O((H W)^2)`` for full self-attention over the grid. Multi-head attention with ``to_q``,
``to_kv`` (bias: ``QKV_BIAS``) and ``to_out`` projections.

The defaults are the official code (easton-cau/SOTR ``adet/modeling/sotr/transformer.py``)::

    x <- cat(x, x) along the width                          (WIDTH_DOUBLING)
    per layer:  x <- x + g_c col(x) + g_r row(x)            (TWIN_MODE "parallel", no norm)
                x <- x + g_1 f_1(x) + g_2 f_2(x)            (CONV_BRANCHES 2, LAYER "hybrid")
    out = mean of the two width halves

with ``f = conv3x3 . LeakyReLU . conv3x3`` and ReZero gates ``g`` initialised to 0 (``GATE``):
the transformer is the identity at initialisation. The doubled width makes the row attention
run over ``2W`` cells and lets the 3x3 convolutions see the other half across the seam.

Named options reproduce the paper's figure instead (ours before the fidelity work):
``TWIN_MODE "sequential"`` (column attention, then row attention on its output), ``POS_EMBED``
(a learned column + row embedding, resized to each grid), ``TWIN_NORM "pre"`` / ``"post"``
(a LayerNorm per branch), ``CONV_BRANCHES 1``, ``QKV_BIAS``, ``WIDTH_DOUBLING False``, and
``LAYER "pure"`` (an MLP FFN sub-layer with its LayerNorm instead of the convolutions).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers import FFNLayer

__all__ = ["AxialAttention", "AxisPositionEmbedding", "ConvBranch", "TwinTransformerLayer", "TwinTransformer",
           "TWIN_MODES", "LAYER_TYPES", "TWIN_NORMS"]

TWIN_MODES = ("parallel", "sequential")
LAYER_TYPES = ("hybrid", "pure")
TWIN_NORMS = ("none", "pre", "post")


class _Gate(nn.Module):
    """ReZero scalar ``alpha`` (init 0) multiplying a branch update; 1 (no parameter) when off."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(())) if enabled else None

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        return update if self.alpha is None else update * self.alpha


class AxialAttention(nn.Module):
    """Multi-head self-attention within each sequence of ``[S, L, C]``:
    ``to_out(softmax(q k^T / sqrt(C / heads)) v)``, ``q = to_q(x)``, ``(k, v) = to_kv(x)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MODEL.SOTR.DIM={dim} must be a multiple of MODEL.SOTR.NUM_HEADS={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        s, length, c = seq.shape
        split = lambda t: t.reshape(s, length, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        k, v = self.to_kv(seq).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split(self.to_q(seq)), split(k), split(v),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(s, length, c))


def _along(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axis: str) -> torch.Tensor:
    """``fn`` on the sequences of ``x [B, C, H, W]`` along ``axis``: "columns" (length H) or
    "rows" (length W), channel-last ``[S, L, C]``; the result back in ``[B, C, H, W]``."""
    b, c, h, w = x.shape
    if axis == "columns":
        seq = x.permute(0, 3, 2, 1).reshape(b * w, h, c)
        return fn(seq).reshape(b, w, h, c).permute(0, 3, 2, 1)
    seq = x.permute(0, 2, 3, 1).reshape(b * h, w, c)
    return fn(seq).reshape(b, h, w, c).permute(0, 3, 1, 2)


def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of ``[B, C, H, W]``."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvBranch(nn.Module):
    """``gate(conv3x3(LeakyReLU(conv3x3(x))))`` on ``[B, C, H, W]`` (an update, no residual)."""

    def __init__(self, dim: int, gate: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gate = _Gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv2(F.leaky_relu(self.conv1(x))))


class TwinTransformerLayer(nn.Module):
    """Twin attention (parallel or sequential branches, optional LayerNorms), then the hybrid
    convolution branches or the FFN; ``[B, C, H, W]`` in and out."""

    def __init__(self, dim: int, num_heads: int, mode: str = "parallel", layer: str = "hybrid", norm: str = "none",
                 gate: bool = True, conv_branches: int = 2, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        for key, value, choices in (("TWIN_MODE", mode, TWIN_MODES), ("LAYER", layer, LAYER_TYPES),
                                    ("TWIN_NORM", norm, TWIN_NORMS)):
            if value not in choices:
                raise ValueError(f"MODEL.SOTR.{key} must be one of {choices}, got {value!r}")
        if layer == "pure" and norm == "none":
            raise ValueError("MODEL.SOTR.LAYER 'pure' (an FFN sub-layer with its LayerNorm) needs MODEL.SOTR.TWIN_NORM "
                             "'pre' or 'post'")
        self.mode, self.norm = mode, norm
        self.col_attn = AxialAttention(dim, num_heads, qkv_bias, dropout)
        self.row_attn = AxialAttention(dim, num_heads, qkv_bias, dropout)
        self.col_gate, self.row_gate = _Gate(gate), _Gate(gate)
        self.col_norm = nn.LayerNorm(dim) if norm != "none" else None
        self.row_norm = nn.LayerNorm(dim) if norm != "none" else None
        self.dropout = nn.Dropout(dropout)
        if layer == "hybrid":
            self.convs: Optional[nn.ModuleList] = nn.ModuleList(ConvBranch(dim, gate) for _ in range(conv_branches))
            self.ffn = None
        else:
            self.convs, self.ffn = None, FFNLayer(dim, 4 * dim, dropout, normalize_before=norm == "pre")

    def _update(self, attn: AxialAttention, norm: Optional[nn.LayerNorm], gate: _Gate, x: torch.Tensor,
                axis: str) -> torch.Tensor:
        fn = attn if self.norm != "pre" else (lambda seq: attn(norm(seq)))
        return self.dropout(gate(_along(fn, x, axis)))

    def _post(self, norm: Optional[nn.LayerNorm], x: torch.Tensor) -> torch.Tensor:
        return _channel_norm(norm, x) if self.norm == "post" else x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Twin attention with its residuals."""
        if self.mode == "parallel":
            x = x + self._update(self.col_attn, self.col_norm, self.col_gate, x, "columns") \
                + self._update(self.row_attn, self.row_norm, self.row_gate, x, "rows")
            return self._post(self.col_norm, x)
        x = self._post(self.col_norm, x + self._update(self.col_attn, self.col_norm, self.col_gate, x, "columns"))
        return self._post(self.row_norm, x + self._update(self.row_attn, self.row_norm, self.row_gate, x, "rows"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        if self.ffn is not None:
            return self.ffn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + sum(branch(x) for branch in self.convs)


class AxisPositionEmbedding(nn.Module):
    """Learned row (``C x H x 1``) + column (``C x 1 x W``) embeddings, linearly resized from
    ``max_len`` positions to the grid size (one module for every grid and the full-size P5)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.row_embed = nn.Parameter(torch.randn(max_len, dim) * 0.02)  # indexed by y
        self.col_embed = nn.Parameter(torch.randn(max_len, dim) * 0.02)  # indexed by x

    @staticmethod
    def _resize(table: torch.Tensor, length: int) -> torch.Tensor:
        if table.shape[0] == length:
            return table
        return F.interpolate(table.T[None], size=length, mode="linear", align_corners=False)[0].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``x + E_row[y] + E_col[x]``."""
        _, _, h, w = x.shape
        return x + self._resize(self.row_embed, h).T[:, :, None] + self._resize(self.col_embed, w).T[:, None, :]


class TwinTransformer(nn.Module):
    """``depth`` twin layers shared by every grid; ``[B, C, H, W]`` in and out (module doc)."""

    def __init__(self, dim: int = 256, depth: int = 12, num_heads: int = 8, mode: str = "parallel",
                 layer: str = "hybrid", pos_embed: bool = False, max_len: int = 40, norm: str = "none",
                 gate: bool = True, dropout: float = 0.0, width_doubling: bool = True, conv_branches: int = 2,
                 qkv_bias: bool = False):
        super().__init__()
        if conv_branches not in (1, 2):
            raise ValueError(f"MODEL.SOTR.CONV_BRANCHES must be 1 or 2, got {conv_branches}")
        self.width_doubling = width_doubling
        self.pos_embed = AxisPositionEmbedding(dim, max_len) if pos_embed else None
        self.layers = nn.ModuleList(
            TwinTransformerLayer(dim, num_heads, mode, layer, norm, gate, conv_branches, qkv_bias, dropout)
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        if self.width_doubling:
            x = torch.cat((x, x), dim=-1)
        for layer in self.layers:
            x = layer(x)
        if self.width_doubling:
            x = torch.stack(x.chunk(2, dim=-1)).mean(dim=0)
        return x
