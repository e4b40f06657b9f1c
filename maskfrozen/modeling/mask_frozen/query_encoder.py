"""Query feature encoder of Mask Frozen-DETR (Sec. 4.4): adapts the frozen detector's
object queries, which were trained to detect over the whole image, to segmenting inside
their own box.

Modes (``MODEL.MASK_FROZEN.QUERY_ENCODER.NAME``), each layer applying in order:

- ``none``: queries unchanged;
- ``cross``: box-to-object cross-attention ``q_i = LN(q_i + CrossAttn(q_i, R_i))``, the
  query attending only to the RoI features of its own box (the paper keeps this alone);
- ``cross_self``: object-to-object self-attention among the N queries of an image first;
- ``cross_self_ffn``: plus an FFN.
"""
import torch
from torch import nn

from maskfrozen.layers.attention import CrossAttentionLayer, FFNLayer, SelfAttentionLayer

from .box_encoder import roi_position_embedding

__all__ = ["QUERY_ENCODERS", "QueryEncoderLayer", "QueryFeatureEncoder"]

QUERY_ENCODERS = ("none", "cross", "cross_self", "cross_self_ffn")


class QueryEncoderLayer(nn.Module):
    """[object-to-object self-attn] -> box-to-object cross-attn -> [FFN], post-norm
    (the shared sub-layers)."""

    def __init__(self, dim: int, roi_dim: int, nhead: int, self_attn: bool, ffn: bool, dim_feedforward: int):
        super().__init__()
        self.self_attn = SelfAttentionLayer(dim, nhead) if self_attn else None
        self.cross_attn = CrossAttentionLayer(dim, nhead, memory_dim=roi_dim)
        self.ffn = FFNLayer(dim, dim_feedforward) if ffn else None

    def forward(self, queries: torch.Tensor, roi_tokens: torch.Tensor, roi_pos: torch.Tensor) -> torch.Tensor:
        """``queries [B, N, C]``, ``roi_tokens [B*N, S*S, C_r]`` -> ``[B, N, C]``: each
        query attends only to the tokens of its own box."""
        b, n, c = queries.shape
        if self.self_attn is not None:
            queries = self.self_attn(queries)
        queries = self.cross_attn(queries.reshape(b * n, 1, c), roi_tokens, memory_pos=roi_pos).view(b, n, c)
        if self.ffn is not None:
            queries = self.ffn(queries)
        return queries


class QueryFeatureEncoder(nn.Module):
    """``depth`` :class:`QueryEncoderLayer` of the chosen mode (identity for ``none``)."""

    def __init__(self, mode: str, dim: int, roi_dim: int, roi_size: int, depth: int = 1, nhead: int = 8,
                 dim_feedforward: int = 1024):
        super().__init__()
        if mode not in QUERY_ENCODERS:
            raise ValueError(f"MODEL.MASK_FROZEN.QUERY_ENCODER.NAME={mode!r}; expected one of {QUERY_ENCODERS}")
        num_layers = 0 if mode == "none" else depth
        self.layers = nn.ModuleList(
            QueryEncoderLayer(dim, roi_dim, nhead, self_attn=mode != "cross", ffn=mode == "cross_self_ffn",
                              dim_feedforward=dim_feedforward) for _ in range(num_layers))
        self.register_buffer("roi_pos", roi_position_embedding(roi_size, roi_dim), persistent=False)

    def forward(self, queries: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``queries [B, N, C]``, RoI features ``rois [B*N, C_r, S, S]`` -> ``[B, N, C]``."""
        if not len(self.layers):
            return queries
        tokens = rois.flatten(2).transpose(1, 2)
        pos = self.roi_pos.to(tokens.dtype)
        for layer in self.layers:
            queries = layer(queries, tokens, pos)
        return queries
