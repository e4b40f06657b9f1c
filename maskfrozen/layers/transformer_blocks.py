"""Transformer building blocks shared by the DETR, mask and SOTR models."""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "get_activation_fn", "gather_tokens"]


def get_activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """"relu" | "gelu" -> the functional activation (shape-preserving: an FFN's hidden
    width stays ``dim_feedforward``)."""
    table = {"relu": F.relu, "gelu": F.gelu}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, L, C]`` tokens, ``index [B, N]`` -> the selected tokens ``[B, N, C]``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head).
    Parameters are ``layers.{i}.{weight,bias}`` as in DETR/detrex."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
