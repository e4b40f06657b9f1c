"""DETR transformer pieces: denoising groups, query attention masks, one-to-many query
counts, and padding invariance of the whole transformer."""
import pytest
import torch

from maskfrozen.layers.box_ops import box_cxcywh_to_xyxy
from maskfrozen.layers.position_encoding import PositionEmbeddingSine
from maskfrozen.modeling.detr import (
    ContrastiveDenoising,
    DeformableTransformer,
    query_self_attention_mask,
    query_slices,
)

D = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _targets():
    return [
        {"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.4, 0.2], [0.5, 0.8, 0.1, 0.1]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]


def test_denoising_group_count_is_the_official_rule():
    """official prepare_for_cdn: n = 2 * dn_number; n // (2 * most GTs) groups when n >= 100,
    else n groups (whatever the GT count); at least one."""
    def groups(num_dn, max_gt):
        return ContrastiveDenoising(num_classes=3, embed_dim=D, num_dn=num_dn).num_groups(max_gt)
    assert [groups(100, m) for m in (1, 3, 7, 100, 101)] == [100, 33, 14, 1, 1]
    assert [groups(50, 3), groups(49, 3), groups(10, 3), groups(1, 60)] == [16, 98, 20, 2]


def test_denoising_groups_counts_indices_and_noise():
    torch.manual_seed(0)
    dn = ContrastiveDenoising(num_classes=3, embed_dim=D, num_dn=1, label_noise=0.0, box_noise=0.4)
    q = dn(_targets())
    # dn_number 1 -> 2 groups of 2M = 6 queries (M = 3 GTs at most)
    assert (q.num_groups, q.group_size, q.num_queries) == (2, 6, 12)
    assert q.content.shape == (2, 12, D) and q.boxes_unact.shape == (2, 12, 4)
    assert q.indices[0][0].tolist() == [0, 1, 2, 6, 7, 8] and q.indices[0][1].tolist() == [0, 1, 2, 0, 1, 2]
    assert q.indices[1][0].tolist() == [0, 6] and q.indices[1][1].tolist() == [0, 0]
    # label noise 0: content = label embedding at used slots (positive and negative), 0 elsewhere
    emb = dn.label_enc.weight
    assert torch.allclose(q.content[0, 3], emb[0]) and torch.allclose(q.content[0, 4], emb[2])
    assert torch.count_nonzero(q.content[1, [1, 2, 4, 5]]) == 0
    # positive edges move < 0.4 * half size, negatives between 1x and 2x that (before clamping)
    gt = _targets()[0]["boxes"]
    half = gt[:, 2:].repeat(1, 2) / 2
    boxes = box_cxcywh_to_xyxy(q.boxes_unact[0].sigmoid())
    ref = box_cxcywh_to_xyxy(gt)
    for g in range(2):
        pos_move = (boxes[g * 6 : g * 6 + 3] - ref).abs()
        neg_move = (boxes[g * 6 + 3 : g * 6 + 6] - ref).abs()
        clamped = (boxes[g * 6 + 3 : g * 6 + 6] <= 1e-4) | (boxes[g * 6 + 3 : g * 6 + 6] >= 1 - 1e-4)
        assert (pos_move <= 0.4 * half + 1e-5).all()
        assert ((neg_move >= 0.4 * half - 1e-5) | clamped).all() and (neg_move <= 0.8 * half + 1e-5).all()


def test_denoising_without_gt_is_none():
    dn = ContrastiveDenoising(num_classes=3, embed_dim=D, num_dn=5)
    assert dn([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]) is None


def test_query_attention_mask_blocks_groups():
    mask = query_self_attention_mask(num_dn_groups=2, dn_group_size=4, num_one2one=3, num_one2many=5)
    assert mask.shape == (16, 16) and mask.dtype == torch.bool
    dn0, dn1, o2o, o2m = slice(0, 4), slice(4, 8), slice(8, 11), slice(11, 16)
    assert mask[o2o, dn0].all() and mask[o2m, dn1].all()  # matching queries never see dn
    assert mask[dn0, dn1].all() and mask[dn1, dn0].all()  # dn groups do not see each other
    assert not mask[dn0, dn0].any() and not mask[dn1, o2o].any()  # a group sees itself and matching
    assert mask[o2o, o2m].all() and mask[o2m, o2o].all()  # H-DETR block diagonal
    assert not mask[o2o, o2o].any() and not mask[o2m, o2m].any()
    assert query_self_attention_mask(0, 0, 3, 0) is None
    assert query_slices(8, 3, 5) == {"dn": dn0.__class__(0, 8), "one2one": o2o, "one2many": o2m}


def _transformer(**kw):
    args = dict(num_classes=3, d_model=D, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                dropout=0.0, num_feature_levels=3, num_queries=5)
    args.update(kw)
    return DeformableTransformer(**args)


DINO = dict(mixed_selection=True, query_pos="dynamic", look_forward_twice=True, decoder_final_norm=True)


def test_one2many_queries_only_in_training():
    torch.manual_seed(0)
    t = _transformer(num_queries_one2many=7, mixed_selection=True)
    srcs = [torch.randn(1, D, s, s) for s in (8, 4, 2)]
    masks = [torch.zeros(1, s, s, dtype=torch.bool) for s in (8, 4, 2)]
    pos = [PositionEmbeddingSine(D // 2)(m) for m in masks]
    out = t.train()(srcs, masks, pos)
    assert out.pred_logits.shape == (2, 1, 12, 3) and out.query_groups["one2many"] == slice(5, 12)
    out = t.eval()(srcs, masks, pos)
    assert out.pred_boxes.shape == (2, 1, 5, 4) and "one2many" not in out.query_groups
    assert out.final_queries.shape == (1, 5, D) and out.final_scores.shape == (1, 5, 3)


@pytest.mark.parametrize("variant", [DINO, dict(mixed_selection=True, look_forward_twice=True), dict(two_stage=False)],
                         ids=["dino", "h_detr", "deformable_detr"])
def test_padding_invariance(variant):
    """With our two options (padded tokens never selected, DINO's query position from the
    image-normalised reference; the official code does neither): image 0 alone vs the same
    features padded (with garbage) in a batch next to a larger image give identical queries,
    boxes, scores and encoder memory."""
    torch.manual_seed(0)
    t = _transformer(**variant, proposals_valid_only=True, query_pos_reference="image").double().eval()
    small, large = [(8, 6), (4, 3), (2, 2)], [(10, 12), (5, 6), (3, 3)]
    alone = [torch.randn(1, D, h, w, dtype=torch.float64) for h, w in small]
    batch = [torch.randn(2, D, h, w, dtype=torch.float64) * 5 for h, w in large]
    masks_alone = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in small]
    masks_batch = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in large]
    for a, b, m, (h, w) in zip(alone, batch, masks_batch, small):
        b[0, :, :h, :w] = a[0]
        m[0] = True
        m[0, :h, :w] = False
    pe = PositionEmbeddingSine(D // 2, offset=-0.5)
    out_a = t(alone, masks_alone, [pe(m).double() for m in masks_alone])
    out_b = t(batch, masks_batch, [pe(m).double() for m in masks_batch])
    for name in ("hidden_states", "pred_logits", "pred_boxes"):
        a, b = getattr(out_a, name)[:, 0], getattr(out_b, name)[:, 0]
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{name}: max diff {(a - b).abs().max()}"
    for lvl, (h, w) in enumerate(small):
        assert torch.allclose(out_a.level_maps()[lvl][0], out_b.level_maps()[lvl][0, :, :h, :w], atol=1e-5, rtol=0)
    if out_a.proposals is not None:
        assert torch.allclose(out_a.proposals.selected_logits[0], out_b.proposals.selected_logits[0], atol=1e-5, rtol=0)


def test_dn_queries_do_not_change_matching_outputs():
    """With the attention mask, adding denoising queries leaves the matching queries'
    outputs unchanged (they cannot see the noised ground truth)."""
    torch.manual_seed(0)
    t = _transformer(**DINO).double().train()
    srcs = [torch.randn(2, D, s, s, dtype=torch.float64) for s in (8, 4, 2)]
    masks = [torch.zeros(2, s, s, dtype=torch.bool) for s in (8, 4, 2)]
    pos = [PositionEmbeddingSine(D // 2)(m).double() for m in masks]
    dn = ContrastiveDenoising(3, D, num_dn=6).double()(_targets())
    with_dn = t(srcs, masks, pos, dn)
    without = t(srcs, masks, pos)
    sl = with_dn.query_groups["one2one"]
    assert with_dn.query_groups["dn"] == slice(0, dn.num_queries)
    assert torch.allclose(with_dn.pred_boxes[:, :, sl], without.pred_boxes, atol=1e-10)


@pytest.mark.parametrize("variant", [DINO, dict(two_stage=False)], ids=["dino", "deformable_detr"])
def test_encode_select_decode_stages_equal_the_one_call_output(variant):
    """The stages called one after the other give the one-call output bit for bit
    (denoising queries included for DINO)."""
    torch.manual_seed(0)
    t = _transformer(**variant).train()
    srcs = [torch.randn(2, D, s, s) for s in (8, 4, 2)]
    masks = [torch.zeros(2, s, s, dtype=torch.bool) for s in (8, 4, 2)]
    pos = [PositionEmbeddingSine(D // 2)(m) for m in masks]
    dn = ContrastiveDenoising(3, D, num_dn=6)(_targets()) if variant is DINO else None
    one_call = t(srcs, masks, pos, dn)
    encoded = t.encode(srcs, masks, pos)
    queries = t.select(encoded, dn)
    decoded = t.decode(encoded, queries)
    assert torch.equal(encoded.memory, one_call.memory)
    for name in ("hidden_states", "pred_logits", "pred_boxes"):
        assert torch.equal(getattr(decoded, name), getattr(one_call, name)), name
    assert queries.query_groups == one_call.query_groups
    if variant is DINO:
        assert torch.equal(queries.proposals.index, one_call.proposals.index)
        assert torch.equal(queries.proposals.logits, one_call.proposals.logits)
        assert one_call.query_groups["dn"] == slice(0, dn.num_queries)


def test_two_stage_selection_pads_when_fewer_tokens_than_queries():
    """4x4 + 2x2 + 1x1 = 21 tokens for 30 queries: every token is selected once, the 9
    padded queries are masked out of self-attention (the real queries' outputs do not
    depend on them) and score 0 at inference."""
    torch.manual_seed(0)
    t = _transformer(**DINO, num_queries=30).double().eval()
    srcs = [torch.randn(1, D, s, s, dtype=torch.float64) for s in (4, 2, 1)]
    masks = [torch.zeros(1, s, s, dtype=torch.bool) for s in (4, 2, 1)]
    pos = [PositionEmbeddingSine(D // 2)(m).double() for m in masks]
    out = t(srcs, masks, pos)
    assert out.pred_logits.shape == (2, 1, 30, 3) and torch.isfinite(out.pred_boxes).all()
    assert out.query_padding[0].tolist() == [False] * 21 + [True] * 9
    assert (out.final_scores[0, 21:] == 0).all() and (out.final_scores[0, :21] > 0).all()
    # the real queries' outputs equal those of a transformer asked for exactly 21 queries
    t21 = _transformer(**DINO, num_queries=21).double().eval()
    state = {k: (v[:21] if k == "tgt_embed.weight" else v) for k, v in t.state_dict().items()}
    t21.load_state_dict(state)
    ref = t21(srcs, masks, pos)
    assert torch.allclose(out.pred_boxes[:, :, :21], ref.pred_boxes, atol=1e-12)
    assert torch.allclose(out.pred_logits[:, :, :21], ref.pred_logits, atol=1e-12)
