"""Transformer sub-layers shared by every model: self-attention, cross-attention (dense,
optionally masked), deformable attention and FFN, each with its residual, dropout and
LayerNorm, and a pre/post-norm switch.

With ``x`` the layer input and ``f`` the sub-layer:

- post-norm (DETR, Deformable-DETR, Mask2Former's default): ``LN(x + drop(f(x)))``;
- pre-norm: ``x + drop(f(LN(x)))``.

Position embeddings are added to queries and keys, never to values (DETR). Every layer
takes and returns ``[N, L, C]`` (batch first). Attribute names: ``attn`` (the attention
module), ``norm``, ``linear1``/``linear2`` (FFN).
"""
from typing import Optional

import torch
from torch import nn

from .ms_deform_attn import MSDeformAttn
from .transformer_blocks import get_activation_fn

__all__ = ["SelfAttentionLayer", "CrossAttentionLayer", "DeformableAttentionLayer", "FFNLayer"]


def _with_pos(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return x if pos is None else x + pos


class _ResidualNorm(nn.Module):
    """The residual + dropout + LayerNorm wrapping shared by every sub-layer."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """What the sub-layer reads: ``LN(x)`` in pre-norm, ``x`` in post-norm."""
        return self.norm(x) if self.normalize_before else x

    def post(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """Residual sum, normalised after it in post-norm."""
        out = x + self.dropout(update)
        return out if self.normalize_before else self.norm(out)


class SelfAttentionLayer(_ResidualNorm):
    """``q = k = x + pos``, ``v = x``: multi-head self-attention over the L tokens."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attn_mask [L, L]`` or ``[N*nhead, L, L]`` bool (True = may not attend)."""
        y = self.pre(x)
        qk = _with_pos(y, pos)
        update = self.attn(qk, qk, y, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.post(x, update)


class CrossAttentionLayer(_ResidualNorm):
    """Queries attend to a memory: ``q = x + pos``, ``k = memory + memory_pos``,
    ``v = memory``. With ``attn_mask`` it is Mask2Former's masked attention."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False,
                 memory_dim: Optional[int] = None):
        super().__init__(d_model, dropout, normalize_before)
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, kdim=memory_dim, vdim=memory_dim,
                                          batch_first=True)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pos: Optional[torch.Tensor] = None,
                memory_pos: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                memory_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [N, Lq, C]``, ``memory [N, Lk, C_m]``; ``attn_mask [N*nhead, Lq, Lk]`` or
        ``[Lq, Lk]`` bool (True = may not attend)."""
        y = self.pre(x)
        update = self.attn(_with_pos(y, pos), _with_pos(memory, memory_pos), memory, attn_mask=attn_mask,
                           key_padding_mask=memory_padding_mask, need_weights=False)[0]
        return self.post(x, update)


class DeformableAttentionLayer(_ResidualNorm):
    """Multi-scale deformable attention of the queries ``x + pos`` on a flattened
    multi-level ``value`` (the encoder's self-attention when ``value`` is ``x`` itself,
    the decoder's cross-attention when it is the encoder memory)."""

    def __init__(self, d_model: int, nhead: int, num_levels: int, num_points: int, dropout: float = 0.0,
                 normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.attn = MSDeformAttn(d_model, nhead, num_levels, num_points)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor], reference_points: torch.Tensor,
                value: Optional[torch.Tensor], spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``value=None``: self-attention (the normalised ``x`` is the value); see
        :class:`MSDeformAttn` for the other arguments."""
        y = self.pre(x)
        update = self.attn(_with_pos(y, pos), reference_points, y if value is None else value, spatial_shapes,
                           level_start_index, padding_mask)
        return self.post(x, update)


class FFNLayer(_ResidualNorm):
    """``linear2(drop(act(linear1(x))))`` with residual and norm."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, activation: str = "relu",
                 normalize_before: bool = False):
        super().__init__(d_model, dropout, normalize_before)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.inner_dropout = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.linear2(self.inner_dropout(self.activation(self.linear1(self.pre(x)))))
        return self.post(x, update)
