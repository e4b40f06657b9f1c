"""Twin attention and the (hybrid) twin transformer of SOTR (Guo et al., ICCV 2021, Sec. 3.2).

A grid ``P in R^{N x N x C}`` (any ``H x W``) is attended within each column (the ``H``
cells of one column attend to each other) and within each row, which costs
``O(H W^2 + H^2 W)`` instead of ``O((H W)^2)`` for full self-attention over the grid.

Two ways of combining the branches (``MODEL.SOTR.TWIN_MODE``):

- ``"sequential"`` (the paper, Fig. 3): column attention, then row attention on its output;
  each is one :class:`~maskfrozen.layers.SelfAttentionLayer` (residual + LayerNorm, pre- or
  post-norm);
- ``"parallel"`` (the public code, easton-cau/SOTR ``transformer.py``):
  ``x + col(x) + row(x)``, both branches read the same input and their updates are summed.

Position embeddings (``POS_EMBED``): the paper adds a learned column embedding
(``1 x N x C``) and row embedding (``N x 1 x C``) to the grid; the public code never passes
its embedding shape, so it runs without one (``POS_EMBED: False``). Ours are learned per axis
at ``max_len`` positions and linearly resized to the grid's ``H`` / ``W``, so one module serves
every grid size (the five levels and the full-resolution P5).

``GATE`` (the public code's ReZero): every branch update is multiplied by a learned scalar
initialised to 0, so with pre-norm the whole transformer is the identity at initialisation.
The hybrid layer (``LAYER: "hybrid"``, Fig. 3c) follows the twin attention with two 3x3
convolutions joined by a LeakyReLU; ``"pure"`` (Fig. 3b) uses the MLP FFN instead.

Not reproduced from the public code: its width doubling (``cat((x, x), -1)`` before the layers,
the mean of both halves after, so its row attention runs over 2W cells), its second parallel
conv branch (``x + ff1(x) + ff2(x)``; ours has one, as the paper describes) and its missing
LayerNorm (``PRE_NORM: True`` puts the paper's LayerNorm on each branch input; with the gates
the layer is still the identity at initialisation, as the public code's is).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskfrozen.layers import FFNLayer, SelfAttentionLayer

__all__ = ["TwinAttention", "AxisPositionEmbedding", "HybridConvBlock", "TwinTransformerLayer", "TwinTransformer",
           "TWIN_MODES", "LAYER_TYPES"]

TWIN_MODES = ("sequential", "parallel")
LAYER_TYPES = ("hybrid", "pure")


class _Gate(nn.Module):
    """ReZero scalar ``alpha`` (init 0) multiplying a branch update; 1 (no parameter) when off."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(())) if enabled else None

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        return update if self.alpha is None else self.alpha * update


def _attend(layer: SelfAttentionLayer, gate: _Gate, seq: torch.Tensor) -> torch.Tensor:
    """The gated attention update of ``layer`` on ``[L, S, C]`` sequences (no residual)."""
    y = layer.pre(seq)
    return gate(layer.attn(y, y, y, need_weights=False)[0])


def _columns(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B*W, H, C]``: one sequence per column."""
    b, h, w, c = x.shape
    return x.permute(0, 2, 1, 3).reshape(b * w, h, c)


def _uncolumns(seq: torch.Tensor, b: int, w: int) -> torch.Tensor:
    return seq.reshape(b, w, seq.shape[1], seq.shape[2]).permute(0, 2, 1, 3)


class TwinAttention(nn.Module):
    """Column then row multi-head attention on ``[B, H, W, C]`` (module doc)."""

    def __init__(self, dim: int, num_heads: int, mode: str = "sequential", pre_norm: bool = True,
                 gate: bool = True, dropout: float = 0.0):
        super().__init__()
        if mode not in TWIN_MODES:
            raise ValueError(f"MODEL.SOTR.TWIN_MODE must be one of {TWIN_MODES}, got {mode!r}")
        self.mode = mode
        self.col = SelfAttentionLayer(dim, num_heads, dropout, normalize_before=pre_norm)
        self.row = SelfAttentionLayer(dim, num_heads, dropout, normalize_before=pre_norm)
        self.col_gate, self.row_gate = _Gate(gate), _Gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        cols = _columns(x)
        col_update = _attend(self.col, self.col_gate, cols)
        if self.mode == "sequential":
            x = _uncolumns(self.col.post(cols, col_update), b, w)
            rows = x.reshape(b * h, w, c)
            return self.row.post(rows, _attend(self.row, self.row_gate, rows)).reshape(b, h, w, c)
        rows = x.reshape(b * h, w, c)
        row_update = _attend(self.row, self.row_gate, rows).reshape(b, h, w, c)
        out = x + self.col.dropout(_uncolumns(col_update, b, w)) + self.row.dropout(row_update)
        return out if self.col.normalize_before else self.col.norm(out)


class AxisPositionEmbedding(nn.Module):
    """Learned column (``1 x W x C``) + row (``H x 1 x C``) embeddings, linearly resized from
    ``max_len`` positions to the grid size."""

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
        """``x [B, H, W, C]`` -> ``x + E_row[y] + E_col[x]``."""
        _, h, w, _ = x.shape
        return x + self._resize(self.row_embed, h)[:, None] + self._resize(self.col_embed, w)[None]


class HybridConvBlock(nn.Module):
    """``x + gate(conv3x3(LeakyReLU(conv3x3(x))))`` on ``[B, H, W, C]`` (Fig. 3c)."""

    def __init__(self, dim: int, gate: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gate = _Gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)
        y = self.conv2(F.leaky_relu(self.conv1(y)))
        return x + self.gate(y.permute(0, 2, 3, 1))


class TwinTransformerLayer(nn.Module):
    """Twin attention followed by the hybrid conv block or the FFN."""

    def __init__(self, dim: int, num_heads: int, mode: str = "sequential", layer: str = "hybrid",
                 pre_norm: bool = True, gate: bool = True, dropout: float = 0.0, ffn_dim: Optional[int] = None):
        super().__init__()
        if layer not in LAYER_TYPES:
            raise ValueError(f"MODEL.SOTR.LAYER must be one of {LAYER_TYPES}, got {layer!r}")
        self.attention = TwinAttention(dim, num_heads, mode, pre_norm, gate, dropout)
        if layer == "hybrid":
            self.local = HybridConvBlock(dim, gate)
        else:
            self.local = FFNLayer(dim, ffn_dim or 4 * dim, dropout, normalize_before=pre_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(self.attention(x))


class TwinTransformer(nn.Module):
    """``depth`` twin layers shared by every grid; ``[B, C, H, W]`` in and out."""

    def __init__(self, dim: int = 256, depth: int = 12, num_heads: int = 8, mode: str = "sequential",
                 layer: str = "hybrid", pos_embed: bool = True, max_len: int = 40, pre_norm: bool = True,
                 gate: bool = True, dropout: float = 0.0):
        super().__init__()
        self.pos_embed = AxisPositionEmbedding(dim, max_len) if pos_embed else None
        self.layers = nn.ModuleList(
            TwinTransformerLayer(dim, num_heads, mode, layer, pre_norm, gate, dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x.permute(0, 3, 1, 2).contiguous()
