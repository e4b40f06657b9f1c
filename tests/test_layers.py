"""Shared building blocks against hand computations: pre/post-norm attention and FFN
sub-layers, the deformable encoder in layers/, boxes from masks."""
import math

import pytest
import torch
from torch import nn

from maskfrozen.layers.attention import CrossAttentionLayer, DeformableAttentionLayer, FFNLayer, SelfAttentionLayer
from maskfrozen.layers.deformable_encoder import DeformableEncoder, flatten_levels
from maskfrozen.layers.transformer_blocks import get_activation_fn
from maskfrozen.modeling.postprocess import boxes_from_masks

X = torch.tensor([[[1.0, 2.0, 4.0]]])  # [N=1, L=1, C=3]


def layer_norm(v):
    """LayerNorm with unit weight, zero bias, eps 1e-5, by hand."""
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [(a - mean) / math.sqrt(var + 1e-5) for a in v]


def _identity_attention(attn: nn.MultiheadAttention):
    """q/k/v and output projections = identity, zero biases: with one key, the update
    is the value itself."""
    with torch.no_grad():
        d = attn.embed_dim
        if attn.in_proj_weight is not None:
            attn.in_proj_weight.copy_(torch.eye(d).repeat(3, 1))
        else:
            for w in (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight):
                w.copy_(torch.eye(d))
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(d))
        attn.out_proj.bias.zero_()


@pytest.mark.parametrize("pre", [False, True], ids=["post_norm", "pre_norm"])
def test_self_attention_layer_hand_computation(pre):
    layer = SelfAttentionLayer(3, 1, normalize_before=pre)
    _identity_attention(layer.attn)
    out = layer(X, pos=torch.full_like(X, 7.0))  # one token: the position cannot change the value
    x = X[0, 0].tolist()
    expected = [a + b for a, b in zip(x, layer_norm(x))] if pre else layer_norm([2 * a for a in x])
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))


@pytest.mark.parametrize("pre", [False, True], ids=["post_norm", "pre_norm"])
def test_cross_attention_layer_hand_computation(pre):
    """Memory of another width (kdim/vdim) and one memory token: the update is the memory."""
    layer = CrossAttentionLayer(3, 1, normalize_before=pre, memory_dim=3)
    _identity_attention(layer.attn)
    memory = torch.tensor([[[0.5, -1.0, 3.0]]])
    out = layer(X, memory, memory_pos=torch.ones_like(memory))
    x, m = X[0, 0].tolist(), memory[0, 0].tolist()
    expected = [a + b for a, b in zip(x, m)]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected if pre else layer_norm(expected)))


@pytest.mark.parametrize("pre", [False, True], ids=["post_norm", "pre_norm"])
def test_ffn_layer_hand_computation(pre):
    """linear1 = I, linear2 = 2I: update = 2 relu(input)."""
    layer = FFNLayer(3, 3, normalize_before=pre)
    with torch.no_grad():
        layer.linear1.weight.copy_(torch.eye(3))
        layer.linear2.weight.copy_(2 * torch.eye(3))
        layer.linear1.bias.zero_()
        layer.linear2.bias.zero_()
    x = torch.tensor([[[1.0, -2.0, 4.0]]])
    out = layer(x)[0, 0]
    v = x[0, 0].tolist()
    if pre:
        expected = [a + 2 * max(b, 0.0) for a, b in zip(v, layer_norm(v))]
    else:
        expected = layer_norm([a + 2 * max(a, 0.0) for a in v])
    torch.testing.assert_close(out, torch.tensor(expected))


class _EchoValue(nn.Module):
    """Stands in for MSDeformAttn: returns the value it is given."""

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index, padding_mask=None):
        return value


@pytest.mark.parametrize("pre", [False, True], ids=["post_norm", "pre_norm"])
def test_deformable_self_attention_reads_the_normed_input_in_pre_norm(pre):
    layer = DeformableAttentionLayer(3, 1, num_levels=1, num_points=1, normalize_before=pre)
    layer.attn = _EchoValue()
    out = layer(X, None, torch.zeros(1, 1, 1, 2), None, torch.tensor([[1, 1]]), torch.tensor([0]))
    x = X[0, 0].tolist()
    expected = [a + b for a, b in zip(x, layer_norm(x))] if pre else layer_norm([2 * a for a in x])
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))


def test_activation_table_has_only_shape_preserving_entries():
    assert get_activation_fn("gelu")(torch.tensor([0.0])).item() == 0.0
    with pytest.raises(ValueError, match="glu"):
        get_activation_fn("glu")


def test_deformable_encoder_output_geometry_and_level_maps():
    """flatten_levels + DeformableEncoder: tokens in level order, per-level maps and
    padding masks come back in their shapes, padded tokens flagged."""
    torch.manual_seed(0)
    encoder = DeformableEncoder(1, d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, activation="relu",
                                num_levels=2, num_points=2)
    srcs = [torch.randn(2, 8, 4, 6), torch.randn(2, 8, 2, 3)]
    masks = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, :, 4:] = True
    masks[1][1, :, 2:] = True
    src, pos, geometry = flatten_levels(srcs, masks, [torch.zeros_like(s) for s in srcs], torch.ones(2, 8))
    assert src.shape == (2, 30, 8) and torch.equal(pos, torch.ones(2, 30, 8))
    assert geometry.level_start_index.tolist() == [0, 24]
    torch.testing.assert_close(geometry.valid_ratios[1], torch.tensor([[4 / 6, 1.0], [2 / 3, 1.0]]))
    out = encoder(src, pos, geometry)
    maps = out.level_maps()
    assert [tuple(m.shape) for m in maps] == [(2, 8, 4, 6), (2, 8, 2, 3)]
    assert torch.equal(out.level_padding_masks()[0], masks[0])
    assert torch.equal(geometry.split_levels(src)[1], srcs[1])
    # the geometry tensors are shared by every batch of these level sizes (the op checks them once)
    _, _, again = flatten_levels([s[:1] for s in srcs], [m[:1] for m in masks], [s[:1] for s in srcs])
    assert again.spatial_shapes is geometry.spatial_shapes and again.level_start_index is geometry.level_start_index
    assert geometry.level_sizes() == [(4, 6), (2, 3)]
    with pytest.raises(ValueError, match="2 feature levels, built for 3"):
        flatten_levels(srcs, masks, srcs, torch.ones(3, 8))


def test_boxes_from_masks_are_tight_and_zero_for_empty_masks():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True  # rows 2..4, columns 3..8
    masks[1, 7, 11] = True
    boxes = boxes_from_masks(masks).tensor
    torch.testing.assert_close(boxes, torch.tensor([[3.0, 2.0, 9.0, 5.0], [11.0, 7.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0]]))
