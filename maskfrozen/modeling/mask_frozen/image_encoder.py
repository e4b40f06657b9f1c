"""Image feature encoders F_e of Mask Frozen-DETR (Sec. 4.2): trainable blocks that refine
the frozen encoder features E before they are fused with C1, ``F = C1 + up(F_e(E))``.

Every encoder maps the detector's encoder output (:class:`EncoderOutput`: memory and
level geometry) to a refined highest-resolution level ``E1 [N, C, H_1, W_1]``; each is
registered in ``IMAGE_ENCODER_REGISTRY`` under its config name:

- ``none``: E1 as is (the paper's baseline);
- ``deformable``: multi-scale deformable encoder blocks over all levels
  ``[E1..E4]`` (MSDeformAttn -> LN -> FFN(GELU) -> LN), the detector's own layer type;
- ``swin``: Swin blocks on E1 (LN -> (shifted) window MSA -> LN -> FFN), alternating
  regular and shifted windows;
- ``convnext``: ConvNeXt blocks on E1 (7x7 depth-wise conv -> LN -> FFN, layer scale).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from torch import nn

from maskfrozen.layers.deformable_encoder import DeformableEncoder, EncoderOutput, flatten_levels
from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.modeling.registries import IMAGE_ENCODER_REGISTRY, build_from_registry

__all__ = [
    "IdentityImageEncoder",
    "DeformableImageEncoder",
    "SwinImageEncoder",
    "ConvNeXtImageEncoder",
    "build_image_encoder",
]


def _depth(cfg: CfgNode) -> int:
    e = cfg.MODEL.MASK_FROZEN.IMAGE_ENCODER
    if e.DEPTH < 1:
        raise ValueError(f"MODEL.MASK_FROZEN.IMAGE_ENCODER.DEPTH must be >= 1 for {e.NAME!r}, got {e.DEPTH}")
    return e.DEPTH


@IMAGE_ENCODER_REGISTRY.register()
class IdentityImageEncoder(nn.Module):
    """F_e = identity: the frozen E1."""

    config_name = "none"

    @configurable
    def __init__(self):
        super().__init__()

    @classmethod
    def from_config(cls, cfg: CfgNode, dim: int, num_levels: int):
        return {}

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return encoded.level_maps()[0]


@IMAGE_ENCODER_REGISTRY.register()
class DeformableImageEncoder(nn.Module):
    """``depth`` multi-scale deformable encoder blocks on ``[E1..E_L]``; returns level 1.
    Positions: sine embedding of each level's padding mask + a learned level embedding."""

    config_name = "deformable"

    @configurable
    def __init__(self, d_model: int, depth: int, num_levels: int, nhead: int = 8, num_points: int = 4,
                 dim_feedforward: int = 1024):
        super().__init__()
        self.encoder = DeformableEncoder(depth, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                         dropout=0.0, activation="gelu", num_levels=num_levels, num_points=num_points)
        self.position = PositionEmbeddingSine(d_model // 2, normalize=True)
        self.level_embeds = nn.Parameter(torch.randn(num_levels, d_model) * 0.02)

    @classmethod
    def from_config(cls, cfg: CfgNode, dim: int, num_levels: int):
        e = cfg.MODEL.MASK_FROZEN.IMAGE_ENCODER
        return {"d_model": dim, "depth": _depth(cfg), "num_levels": num_levels, "nhead": e.NHEADS,
                "num_points": e.N_POINTS, "dim_feedforward": e.DIM_FEEDFORWARD}

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        if len(encoded.spatial_shapes) != len(self.level_embeds):
            raise ValueError(f"DeformableImageEncoder: detector gives {len(encoded.spatial_shapes)} levels, "
                             f"built for {len(self.level_embeds)}")
        masks = encoded.level_padding_masks()
        pos = [self.position(m).to(encoded.memory.dtype) for m in masks]
        src, pos, geometry = flatten_levels(encoded.level_maps(), masks, pos, self.level_embeds)
        return self.encoder(src, pos, geometry).level_maps()[0]


# ----------------------------------------------------------------------------- Swin
def _relative_position_index(window: int) -> torch.Tensor:
    """``[w*w, w*w]`` index into the ``(2w-1)^2`` relative-position bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, w*w]
    rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[N, H, W, C]`` (H, W multiples of window) -> ``[N * nW, w*w, C]``."""
    n, h, w, c = x.shape
    x = x.view(n, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _merge_windows(x: torch.Tensor, window: int, n: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`."""
    x = x.view(n, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, -1)


def _shift_mask(h: int, w: int, window: int, shift: int, device) -> torch.Tensor:
    """``[nW, w*w, w*w]`` additive mask keeping attention inside the regions that a
    cyclic shift brought together in one window (Swin)."""
    region = torch.zeros(1, h, w, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for ys in bands:
        for xs in bands:
            region[:, ys, xs] = label
            label += 1
    ids = _windows(region, window)[..., 0]  # [nW, w*w]
    different = ids[:, :, None] != ids[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill(different, float("-inf"))


class SwinBlock(nn.Module):
    """x = x + W-MSA(LN(x)); x = x + FFN(LN(x)), window attention with a learned
    relative-position bias, optionally on a cyclically shifted map."""

    def __init__(self, dim: int, nhead: int, window: int = 7, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % nhead:
            raise ValueError(f"SwinBlock: dim={dim} not divisible by nhead={nhead}")
        self.nhead, self.window, self.shift = nhead, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, nhead))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("rel_index", _relative_position_index(window), persistent=False)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``[B, T, C]`` windows -> ``[B, T, C]``; ``mask [nW, T, T]`` for shifted windows."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.nhead, c // self.nhead).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.rel_index.flatten()].view(t, t, self.nhead).permute(2, 0, 1)  # [h, T, T]
        bias = bias[None].expand(b, -1, -1, -1)
        if mask is not None:
            bias = (bias.view(-1, mask.shape[0], self.nhead, t, t) + mask[None, :, None]).view(b, self.nhead, t, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, C]`` -> ``[N, H, W, C]``."""
        n, h, w, _ = x.shape
        win = self.window
        y = self.norm1(x)
        pad_h, pad_w = (-h) % win, (-w) % win
        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        shift = self.shift if min(hp, wp) > win else 0
        mask = None
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            mask = _shift_mask(hp, wp, win, shift, x.device)
        y = _merge_windows(self.attention(_windows(y, win), mask), win, n, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


@IMAGE_ENCODER_REGISTRY.register()
class SwinImageEncoder(nn.Module):
    """``depth`` Swin blocks on E1, shifted windows in every second block."""

    config_name = "swin"

    @configurable
    def __init__(self, d_model: int, depth: int, nhead: int = 8, window: int = 7):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(d_model, nhead, window, shift=(window // 2 if i % 2 else 0)) for i in range(depth))

    @classmethod
    def from_config(cls, cfg: CfgNode, dim: int, num_levels: int):
        e = cfg.MODEL.MASK_FROZEN.IMAGE_ENCODER
        return {"d_model": dim, "depth": _depth(cfg), "nhead": e.NHEADS, "window": e.WINDOW_SIZE}

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        x = encoded.level_maps()[0].permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    """x = x + gamma * FFN(LN(DWConv7x7(x))), layer scale gamma initialised to 1e-6."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.linear2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.linear2(F.gelu(self.linear1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


@IMAGE_ENCODER_REGISTRY.register()
class ConvNeXtImageEncoder(nn.Module):
    """``depth`` ConvNeXt blocks on E1."""

    config_name = "convnext"

    @configurable
    def __init__(self, d_model: int, depth: int, kernel_size: int = 7):
        super().__init__()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(d_model, kernel_size) for _ in range(depth)))

    @classmethod
    def from_config(cls, cfg: CfgNode, dim: int, num_levels: int):
        return {"d_model": dim, "depth": _depth(cfg)}

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.blocks(encoded.level_maps()[0])


def build_image_encoder(cfg: CfgNode, dim: int, num_levels: int) -> nn.Module:
    """F_e named by ``MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME`` for a detector of width ``dim``
    with ``num_levels`` feature levels."""
    name = cfg.MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME
    return build_from_registry(IMAGE_ENCODER_REGISTRY, name, "MODEL.MASK_FROZEN.IMAGE_ENCODER.NAME", cfg, dim,
                               num_levels)
