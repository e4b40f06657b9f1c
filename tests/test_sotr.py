"""SOTR: twin attention against a hand-written column-then-row attention, identity at init,
Matrix NMS against its formula, SOLO targets on hand-made objects, dynamic conv against an
explicit conv, configs (code defaults = COCO R50 yaml), boxes from masks, the tiny config
overfitting one image, and predictions at the input size."""
import glob
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import maskfrozen
from conftest import REPO, make_cfg, overfit_loss_history
from maskfrozen.config import add_sotr_config
from maskfrozen.data.mappers import build_mapper
from maskfrozen.modeling.sotr import TwinAttention, TwinTransformer, dynamic_conv, matrix_nms, point_nms
from maskfrozen.modeling.sotr.targets import centre_region, solo_level_targets

TINY = os.path.join(REPO, "configs", "shapes", "sotr", "sotr_R18_tiny.yaml")
SHAPES = sorted(glob.glob(os.path.join(REPO, "configs", "shapes", "sotr", "*.yaml")))
COCO = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "coco", "sotr", "*.yaml")) if "Base-" not in p)


# ----------------------------------------------------------------------------- twin attention
def _mha(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit multi-head self-attention ``softmax(q k^T / sqrt(d)) v`` on ``[S, L, C]``."""
    s, length, c = x.shape
    h = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    split = lambda t: t.reshape(s, length, h, c // h).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(s, length, c)
    return attn.out_proj(out)


def _by_hand(twin: TwinAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-column then per-row attention with loops over the columns and rows (pre-norm, no gate)."""
    b, h, w, c = x.shape
    col_update = torch.zeros_like(x)
    for j in range(w):  # column j: the H cells x[:, :, j] attend to each other
        col_update[:, :, j] = _mha(twin.col.attn, twin.col.norm(x[:, :, j]))
    mid = x + col_update if mode == "sequential" else x
    row_update = torch.zeros_like(x)
    for i in range(h):  # row i: the W cells attend to each other
        row_update[:, i] = _mha(twin.row.attn, twin.row.norm(mid[:, i]))
    return mid + row_update if mode == "sequential" else x + col_update + row_update


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_twin_attention_equals_column_then_row_attention(mode):
    torch.manual_seed(0)
    twin = TwinAttention(dim=8, num_heads=2, mode=mode, pre_norm=True, gate=False).eval()
    x = torch.randn(2, 3, 5, 8)  # H != W catches a swapped axis
    with torch.no_grad():
        assert torch.allclose(twin(x), _by_hand(twin, x, mode), atol=1e-5)


def test_twin_attention_modes_differ():
    """Same weights: sequential (paper) and parallel (public code) give different outputs."""
    torch.manual_seed(0)
    seq = TwinAttention(8, 2, "sequential", gate=False).eval()
    par = TwinAttention(8, 2, "parallel", gate=False).eval()
    par.load_state_dict(seq.state_dict())
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert not torch.allclose(seq(x), par(x), atol=1e-4)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("layer", ["hybrid", "pure"])
def test_transformer_identity_at_init_with_zero_gates(mode, layer):
    """ReZero gates (init 0) + pre-norm: the twin transformer is the identity at init (the
    public code's design); with position embeddings it adds them; without gates it is not."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        plain = TwinTransformer(16, 2, 4, mode, layer, pos_embed=False, max_len=8)
        if layer == "hybrid":
            assert torch.equal(plain(x), x)
        with_pos = TwinTransformer(16, 2, 4, mode, layer, pos_embed=True, max_len=8)
        pe = with_pos.pos_embed
        expected = x + (pe._resize(pe.row_embed, 6)[:, None] + pe._resize(pe.col_embed, 7)[None]).permute(2, 0, 1)
        if layer == "hybrid":
            assert torch.allclose(with_pos(x), expected, atol=1e-6)
        ungated = TwinTransformer(16, 1, 4, mode, layer, pos_embed=False, gate=False)
        assert not torch.allclose(ungated(x), x)


# ----------------------------------------------------------------------------- matrix NMS
def _box_mask(y0, y1, x0, x1, size=8):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_matrix_nms_decays_a_duplicate_as_the_formula_says():
    a = _box_mask(0, 4, 0, 4)  # 16 px
    b = _box_mask(0, 4, 2, 6)  # 16 px, 8 shared with a: IoU 1/3
    masks = torch.stack([a, b])
    scores = torch.tensor([0.9, 0.8])
    same = torch.tensor([1, 1])
    iou = 1 / 3
    gauss = matrix_nms(masks, same, scores, "gaussian", sigma=2.0)
    assert torch.allclose(gauss, torch.tensor([0.9, 0.8 * math.exp(-2.0 * iou ** 2)]))
    linear = matrix_nms(masks, same, scores, "linear")
    assert torch.allclose(linear, torch.tensor([0.9, 0.8 * (1 - iou)]))
    # another class: no decay
    assert torch.allclose(matrix_nms(masks, torch.tensor([1, 2]), scores), scores)


def test_matrix_nms_compensates_a_suppressed_suppressor():
    """c overlaps only b, and b is a near-duplicate of a: c's decay is divided by f(iou_ab)."""
    a, b, c = _box_mask(0, 4, 0, 4), _box_mask(0, 4, 1, 5), _box_mask(0, 4, 3, 7)
    scores = torch.tensor([0.9, 0.8, 0.7])
    out = matrix_nms(torch.stack([a, b, c]), torch.tensor([0, 0, 0]), scores, "gaussian", 2.0)
    f = lambda u: math.exp(-2.0 * u ** 2)  # noqa: E731
    iou_ab, iou_ac, iou_bc = 12 / 20, 4 / 28, 8 / 24
    decay_c = min(f(iou_ac) / f(0.0), f(iou_bc) / f(iou_ab))
    assert torch.allclose(out, torch.tensor([0.9, 0.8 * f(iou_ab), 0.7 * decay_c]))


def test_point_nms_keeps_local_maxima():
    heat = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.5, 0.4], [0.6, 0.2, 0.8]])[None, None]
    kept = point_nms(heat)[0, 0]
    # a cell survives when it is the max of the 2x2 window ending at it (SOLO's max-pool)
    assert kept[0, 1] == 0.9 and kept[2, 2] == 0.8 and kept[1, 1] == 0 and kept[0, 0] == 0.1


# ----------------------------------------------------------------------------- targets
def test_solo_targets_put_an_object_on_its_levels_and_centre_cells():
    size, label = 256, 3
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 100:140, 60:180] = True  # 120 wide, 40 high: sqrt(area) = 69.3, centre (120, 120)
    boxes = torch.tensor([[60.0, 100.0, 180.0, 140.0]])
    ranges = [[1, 32], [16, 64], [32, 128], [64, 256], [128, 1024]]
    levels = solo_level_targets(boxes, mask, torch.tensor([label]), [20, 16, 12, 8, 6], ranges, 0.2, num_classes=5)
    positive = [(t.gt_index >= 0).nonzero().tolist() for t in levels]
    assert positive[0] == [] and positive[1] == [] and positive[4] == []
    # grid 12 (21.3 px cells): centre cell (5, 5); half region 4 px high, 12 px wide -> cols 5..6
    assert positive[2] == [[5, 5], [5, 6]]
    # grid 8 (32 px cells): centre (3, 3); rows 116..124 px -> row 3, columns 108..132 px -> 3..4
    assert positive[3] == [[3, 3], [3, 4]]
    assert (levels[2].labels[5, 5:7] == label).all() and (levels[2].labels == label).sum() == 2
    assert (levels[2].labels != label).eq(levels[2].labels == 5).all()  # the rest is background (K = 5)


def test_centre_region_is_clipped_to_3x3_cells():
    # a huge region around cell (5, 5) of a 10x10 grid over 100 px: only rows/cols 4..6
    assert centre_region(55.0, 55.0, 40.0, 40.0, (100, 100), 10) == (4, 6, 4, 6)
    assert centre_region(2.0, 98.0, 30.0, 30.0, (100, 100), 10) == (0, 1, 8, 9)


# ----------------------------------------------------------------------------- dynamic conv
def test_dynamic_conv_equals_an_explicit_1x1_conv():
    torch.manual_seed(0)
    feature, kernels = torch.randn(6, 9, 11), torch.randn(4, 6)
    expected = F.conv2d(feature[None], kernels.view(4, 6, 1, 1))[0]
    assert torch.allclose(dynamic_conv(feature, kernels), expected, atol=1e-5)


# ----------------------------------------------------------------------------- configs
def _load(path):
    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def test_code_defaults_equal_the_coco_r50_yaml():
    cfg = get_cfg()
    add_sotr_config(cfg)
    shipped = _load(os.path.join(REPO, "configs/coco/sotr/sotr_R50.yaml"))
    assert dict(shipped.MODEL.SOTR) == dict(cfg.MODEL.SOTR)
    rt = _load(os.path.join(REPO, "configs/coco/sotr/sotr_RT_R50_736.yaml"))
    assert (rt.MODEL.SOTR.DEPTH, rt.INPUT.MIN_SIZE_TEST) == (2, 736)
    assert (shipped.SOLVER.MAX_ITER, shipped.SOLVER.STEPS, shipped.SOLVER.BASE_LR) == (300000, (210000, 250000), 0.01)


@pytest.mark.parametrize("path", COCO + SHAPES, ids=os.path.basename)
def test_config_builds_sotr(path, one_thread):
    cfg = _load(path)
    # smaller, same structure: keeps the test fast
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                         "MODEL.SOTR.DEPTH", 1])
    model = build_model(cfg)
    assert type(model).__name__ == "SOTR"
    assert len(model.head.transformer.layers) == 1


def test_dim_must_equal_fpn_channels():
    cfg = _load(TINY)
    cfg.MODEL.SOTR.DIM = 48
    with pytest.raises(ValueError, match="MODEL.SOTR.DIM=48"):
        build_model(cfg)


# ----------------------------------------------------------------------------- end to end
def _tiny_batch(cfg, n=1):
    mapper = build_mapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("shapes_tiny_train")[:n]]


@pytest.mark.parametrize("opts", [("MODEL.SOTR.TWIN_MODE", "parallel", "MODEL.SOTR.POS_EMBED", "False"),
                                  ("MODEL.SOTR.LAYER", "pure", "MODEL.SOTR.PRE_NORM", "False",
                                   "MODEL.SOTR.GATE", "False", "MODEL.SOTR.TEST.NMS_KERNEL", "linear")],
                         ids=["public_code", "pure_postnorm_linear"])
def test_variants_train_and_predict(opts, tmp_path, one_thread):
    cfg = make_cfg(TINY, tmp_path, *opts)
    model = build_model(cfg)
    batch = _tiny_batch(cfg, 2)
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_mask"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.kernel.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    assert out.image_size == (batch[0]["height"], batch[0]["width"])


def test_tiny_config_overfits_one_image_and_boxes_enclose_masks(tmp_path, one_thread):
    torch.manual_seed(0)
    cfg = make_cfg(TINY, tmp_path)
    model = build_model(cfg)
    batch = _tiny_batch(cfg, 1)
    history = overfit_loss_history(model, batch, steps=120, lr=2e-3)
    assert history[-1] < 0.3 * history[0]
    model.eval()
    with torch.no_grad():
        out = model(batch)[0]["instances"]
    gt = batch[0]["instances"].gt_masks.tensor
    assert len(out) > 0
    inter = (out.pred_masks[:, None] & gt[None]).flatten(2).sum(-1).float()
    union = (out.pred_masks[:, None] | gt[None]).flatten(2).sum(-1).float()
    best_iou = (inter / union).max(0).values
    # every GT is segmented by a prediction, except those below SOLO's minimum mask area (area
    # at 1/4 scale > the level stride, 8: 128 px at full scale), dropped by design
    large = gt.flatten(1).sum(1) > 16 * 8
    assert large.sum() >= 3 and (best_iou[large] > 0.5).all()
    # real boxes: every mask pixel inside its box, and the box tight (touches the mask)
    for mask, box in zip(out.pred_masks, out.pred_boxes.tensor):
        ys, xs = mask.nonzero(as_tuple=True)
        assert len(ys) > 0
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_predictor_output_at_input_size(tmp_path, one_thread):
    cfg = make_cfg(TINY, tmp_path)
    predictor = maskfrozen.Predictor(cfg)
    image = np.random.RandomState(0).randint(0, 255, (97, 150, 3), dtype=np.uint8)
    instances = predictor(image)["instances"]
    assert instances.image_size == (97, 150)
    assert {"pred_masks", "pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
    assert instances.pred_masks.shape[1:] == (97, 150)


def test_trainer_runs_the_tiny_config(tmp_path, one_thread):
    from maskfrozen.engine import Trainer

    cfg = make_cfg(TINY, tmp_path, "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert os.path.isfile(tmp_path / "model_final.pth")
