"""SOTR: the twin transformer against hand-written column / row attention (official structure:
width doubling, parallel branches, two conv branches), identity at init, Matrix NMS against
its formula, SOLO targets on hand-made objects (float32 cell arithmetic, shared cells, pixel
indices), GT mask targets (OpenCV on the unpadded mask), the official dice by hand, dynamic conv
against an explicit conv, configs (code defaults = COCO R50 yaml, NUM_GRIDS validation), the
tiny config overfitting one image, and predictions at the input size."""
import glob
import math
import os

import cv2
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
from maskfrozen.modeling.criterion.mask_losses import squared_dice_loss
from maskfrozen.modeling.sotr import TwinTransformer, TwinTransformerLayer, dynamic_conv, matrix_nms, point_nms
from maskfrozen.modeling.sotr.targets import centre_regions, gt_mask_targets, solo_level_targets

TINY = os.path.join(REPO, "configs", "shapes", "sotr", "sotr_R18_tiny.yaml")
SHAPES = sorted(glob.glob(os.path.join(REPO, "configs", "shapes", "sotr", "*.yaml")))
COCO = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "coco", "sotr", "*.yaml")) if "Base-" not in p)
# our variant (the paper's figure): the options the shapes recipe was first tuned with
OURS = ("MODEL.SOTR.TWIN_MODE", "sequential", "MODEL.SOTR.WIDTH_DOUBLING", "False", "MODEL.SOTR.CONV_BRANCHES", "1",
        "MODEL.SOTR.TWIN_NORM", "pre", "MODEL.SOTR.POS_EMBED", "True", "MODEL.SOTR.QKV_BIAS", "True",
        "MODEL.SOTR.DICE", "smoothed", "MODEL.SOTR.TARGET_CENTRES", "pixel_centre",
        "MODEL.SOTR.GT_MASK_RESIZE", "padded",
        "MODEL.SOTR.TEST.EXACT_UPSAMPLE", "True")


# ----------------------------------------------------------------------------- twin transformer
def _attend(attn, seq: torch.Tensor) -> torch.Tensor:
    """Explicit multi-head attention ``to_out(softmax(q k^T / sqrt(d)) v)`` on one ``[L, C]`` sequence."""
    length, c = seq.shape
    h = attn.num_heads
    q, (k, v) = attn.to_q(seq), attn.to_kv(seq).chunk(2, -1)
    split = lambda t: t.reshape(length, h, c // h).transpose(0, 1)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // h)).softmax(-1)
    return attn.to_out((weights @ split(v)).transpose(0, 1).reshape(length, c))


def _layer_by_hand(layer: TwinTransformerLayer, x: torch.Tensor) -> torch.Tensor:
    """One layer with loops over the columns and rows of ``x [B, C, H, W]`` (no norm or pre-norm)."""
    b, c, h, w = x.shape
    norm = (lambda t, ln: ln(t)) if layer.norm == "pre" else (lambda t, ln: t)  # noqa: E731

    def col_update(src):
        out = torch.zeros_like(src)
        for j in range(w):  # column j: the H cells attend to each other
            for i in range(b):
                out[i, :, :, j] = _attend(layer.col_attn, norm(src[i, :, :, j].T, layer.col_norm)).T
        return out * layer.col_gate.alpha

    def row_update(src):
        out = torch.zeros_like(src)
        for y in range(h):  # row y: the W cells attend to each other
            for i in range(b):
                out[i, :, y, :] = _attend(layer.row_attn, norm(src[i, :, y, :].T, layer.row_norm)).T
        return out * layer.row_gate.alpha

    if layer.mode == "parallel":
        x = x + col_update(x) + row_update(x)
    else:
        x = x + col_update(x)
        x = x + row_update(x)
    convs = [br.gate.alpha * br.conv2(F.leaky_relu(br.conv1(x))) for br in layer.convs]
    return x + sum(convs)


def _with_gates(module: torch.nn.Module, value: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("alpha"):
                p.fill_(value)
    return module


@pytest.mark.parametrize("mode,norm,branches", [("parallel", "none", 2), ("sequential", "pre", 1)],
                         ids=["official", "ours"])
def test_twin_layer_equals_column_and_row_attention_by_hand(mode, norm, branches):
    torch.manual_seed(0)
    layer = _with_gates(TwinTransformerLayer(8, 2, mode, "hybrid", norm, conv_branches=branches)).eval()
    x = torch.randn(2, 8, 3, 5)  # H != W catches a swapped axis
    with torch.no_grad():
        assert torch.allclose(layer(x), _layer_by_hand(layer, x), atol=1e-5)


def test_official_transformer_doubles_the_width_and_averages_the_halves():
    """``cat(x, x)`` along the width through the layers, then the mean of both halves: not the
    layers on ``x`` alone (the row attention and the convs see the other half)."""
    torch.manual_seed(0)
    doubled = _with_gates(TwinTransformer(8, 2, 2, width_doubling=True)).eval()
    single = TwinTransformer(8, 2, 2, width_doubling=False).eval()
    single.load_state_dict(doubled.state_dict())
    x = torch.randn(1, 8, 4, 6)
    with torch.no_grad():
        y = torch.cat((x, x), -1)
        for layer in doubled.layers:
            y = _layer_by_hand(layer, y)
        assert torch.allclose(doubled(x), (y[..., :6] + y[..., 6:]) / 2, atol=1e-5)
        assert not torch.allclose(doubled(x), single(x), atol=1e-3)


def test_official_attention_projections_have_no_qkv_bias():
    layer = TwinTransformerLayer(8, 2)
    assert layer.col_attn.to_q.bias is None and layer.col_attn.to_kv.bias is None
    assert layer.col_attn.to_out.bias is not None and layer.col_norm is None
    assert len(layer.convs) == 2


@pytest.mark.parametrize("options", [{}, {"mode": "sequential", "norm": "pre", "conv_branches": 1, "qkv_bias": True,
                                          "width_doubling": False}], ids=["official", "ours"])
def test_transformer_is_the_identity_at_init(options):
    """ReZero gates start at 0: the twin transformer is the identity (the official design); with
    position embeddings it adds them; without gates it is not."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        assert torch.equal(TwinTransformer(16, 2, 4, **options)(x), x)
        with_pos = TwinTransformer(16, 2, 4, pos_embed=True, max_len=8, **options)
        pe = with_pos.pos_embed
        expected = x + (pe._resize(pe.row_embed, 6)[:, None] + pe._resize(pe.col_embed, 7)[None]).permute(2, 0, 1)
        assert torch.allclose(with_pos(x), expected, atol=1e-6)
        assert not torch.allclose(TwinTransformer(16, 1, 4, gate=False, **options)(x), x)


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
RANGES = [[1, 32], [16, 64], [32, 128], [64, 256], [128, 1024]]


def test_solo_targets_put_an_object_on_its_levels_and_centre_cells():
    size, label = 256, 3
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 100:140, 60:180] = True  # 120 wide, 40 high: sqrt(area) = 69.3, centre (119.5, 119.5) in pixel indices
    boxes = torch.tensor([[60.0, 100.0, 180.0, 140.0]])
    levels = solo_level_targets(boxes, mask, torch.tensor([label]), (size, size), [20, 16, 12, 8, 6], RANGES, 0.2, 5)
    cells = [t.cells.tolist() for t in levels]
    assert cells[0] == [] and cells[1] == [] and cells[4] == []
    # grid 12 (21.3 px cells): centre cell (5, 5); region +-4 px high, +-12 px wide -> columns 5..6
    assert cells[2] == [5 * 12 + 5, 5 * 12 + 6]
    # grid 8 (32 px cells): centre (3, 3); rows 115.5..123.5 px -> row 3, columns 107.5..131.5 px -> 3..4
    assert cells[3] == [3 * 8 + 3, 3 * 8 + 4]
    assert (levels[2].labels[5, 5:7] == label).all() and (levels[2].labels == label).sum() == 2
    assert (levels[2].labels != label).eq(levels[2].labels == 5).all()  # the rest is background (K = 5)
    assert levels[2].positive.sum() == 2 and levels[2].gt_index.tolist() == [0, 0]


def test_a_cell_shared_by_two_objects_keeps_a_target_per_object():
    """Two objects with the same centre cell: each (cell, object) pair is a mask target; the
    cell's class is the later object's; the positive cell counts once."""
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 20:40, 20:40] = True
    masks[1, 22:38, 18:42] = True
    boxes = torch.tensor([[20.0, 20.0, 40.0, 40.0], [18.0, 22.0, 42.0, 38.0]])
    (level,) = solo_level_targets(boxes, masks, torch.tensor([1, 2]), (64, 64), [4], [[1, 64]], 0.2, 3)
    assert level.cells.tolist() == [5, 5] and level.gt_index.tolist() == [0, 1]  # cell (1, 1) of 16 px cells
    assert level.labels[1, 1] == 2 and level.positive.sum() == 1


def test_centres_are_pixel_indices_and_cells_float32_floor_divisions():
    """Rows 9..11 (3 px high, sigma 0.2: +-0.3 px) on 11 cells of 2 px: the centre of mass in
    pixel indices (official) is row 10, its region 9.7..10.3 px spans cells 4 and 5; as a pixel
    centre (10.5, ours) 10.2..10.8 px only cell 5."""
    mask = torch.zeros(1, 22, 22, dtype=torch.bool)
    mask[0, 9:12] = True
    box = torch.tensor([[0.0, 9.0, 22.0, 12.0]])
    rows = lambda t: sorted({c // 11 for c in t.cells.tolist()})  # noqa: E731
    index = solo_level_targets(box, mask, torch.tensor([0]), (22, 22), [11], [[1, 100]], 0.2, 1)[0]
    centre = solo_level_targets(box, mask, torch.tensor([0]), (22, 22), [11], [[1, 100]], 0.2, 1, 0.5)[0]
    assert rows(index) == [4, 5] and rows(centre) == [5]
    # the official float32 arithmetic: (8.5 + 1.1) / 96 // (1 / 10) is 1 in float32 (0 in float64)
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert centre_regions(t(8.5), t(50.0), t(1.1), t(1.0), (96, 128), 10)[0, 1] == 1
    assert (8.5 + 1.1) / 96 // (1 / 10) == 0


def test_centre_regions_are_clipped_to_3x3_cells():
    t = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    # a huge region around cell (5, 5) of a 10x10 grid over 100 px: only rows/cols 4..6
    assert centre_regions(t(55.0), t(55.0), t(40.0), t(40.0), (100, 100), 10).tolist() == [[4, 6, 4, 6]]
    assert centre_regions(t(2.0), t(98.0), t(30.0), t(30.0), (100, 100), 10).tolist() == [[0, 1, 8, 9]]


def test_gt_mask_targets_resize_the_unpadded_mask_with_opencv_and_paste_it_top_left():
    """Official: a 13 x 19 image's mask resized by OpenCV to round(size / 4) = 3 x 5, pasted
    into the 8 x 8 mask-feature grid of its 32 x 32 padded batch; ours ("padded"): the padded
    mask resized to exactly 8 x 8, >= 0.5."""
    rng = np.random.RandomState(0)
    masks = torch.from_numpy(rng.rand(2, 13, 19) > 0.4)
    out = gt_mask_targets(masks, (8, 8), "unpadded")
    for m, o in zip(masks, out):
        expected = cv2.resize(m.numpy().astype(np.uint8), (5, 3), interpolation=cv2.INTER_LINEAR)
        assert torch.equal(o[:3, :5], torch.from_numpy(expected).float())
    assert out[:, 3:].sum() == 0 and out[:, :, 5:].sum() == 0
    padded = F.pad(masks, (0, 13, 0, 19)).float()[:, None]
    expected = (F.interpolate(padded, size=(8, 8), mode="bilinear", align_corners=False)[:, 0] >= 0.5).float()
    assert torch.equal(gt_mask_targets(masks, (8, 8), "padded"), expected)
    assert gt_mask_targets(masks[:0], (8, 8)).shape == (0, 8, 8)


def test_loss_on_images_without_objects():
    """An image without objects adds background cells only; a batch without any object gives a
    zero mask loss that still reaches every kernel (the official code crashes on both)."""
    from maskfrozen.modeling.sotr import SOTRLoss

    torch.manual_seed(0)
    loss = SOTRLoss(3, [4, 2], [[1, 64], [32, 128]])
    logits = [torch.randn(2, 4, 4, 3, requires_grad=True), torch.randn(2, 2, 2, 3, requires_grad=True)]
    kernels = [torch.randn(2, 4, 4, 8, requires_grad=True), torch.randn(2, 2, 2, 8, requires_grad=True)]
    feature = torch.randn(2, 8, 16, 16)
    masks = torch.zeros(1, 60, 50, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    one = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0]}
    mixed = loss(logits, kernels, feature, [one, empty])
    assert all(torch.isfinite(v) and v > 0 for v in mixed.values())
    none = loss(logits, kernels, feature, [empty, empty])
    assert none["loss_mask"] == 0
    sum(none.values()).backward()
    assert kernels[0].grad is not None and logits[0].grad.abs().sum() > 0


def test_official_dice_is_two_pt_over_the_sums_of_squares():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = logits.sigmoid()
    expected = [1 - 2 * (p[0, 0] + p[0, 1]) / ((p[0] ** 2).sum() + 2 + 0.002), 1 - 0 / ((p[1] ** 2).sum() + 0.002)]
    assert torch.allclose(squared_dice_loss(logits, targets, 2.0), sum(expected) / 2)


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


@pytest.mark.parametrize("grids", [[12, 10, 0, 6, 4], [12, 10, -8, 6, 4], [12, 10, 8, 6], [12, 10, 8.5, 6, 4]],
                         ids=["zero", "negative", "too_few", "fraction"])
def test_num_grids_must_be_one_positive_size_per_level(grids):
    """Issue 24 item 15: a clear build-time error naming the key (was an interpolate error)."""
    cfg = _load(TINY)
    cfg.MODEL.SOTR.NUM_GRIDS = grids
    with pytest.raises(ValueError, match=r"MODEL\.SOTR\.NUM_GRIDS=.*one positive integer grid size per level.*5 lev"):
        build_model(cfg)


def test_shapes_recipe_states_its_variant():
    """Every official-vs-ours option is spelled out in the shapes recipe (README numbers name it)."""
    with open(os.path.join(REPO, "configs/shapes/sotr/sotr_R18.yaml")) as f:
        text = f.read()
    for key in OURS[::2]:
        assert f"{key.split('.')[-1]}:" in text, key


# ----------------------------------------------------------------------------- end to end
def _tiny_batch(cfg, n=1):
    mapper = build_mapper(cfg, is_train=True)
    return [mapper(d) for d in DatasetCatalog.get("shapes_tiny_train")[:n]]


@pytest.mark.parametrize("opts", [(), OURS, ("MODEL.SOTR.LAYER", "pure", "MODEL.SOTR.TWIN_NORM", "post",
                                           "MODEL.SOTR.GATE", "False", "MODEL.SOTR.TEST.NMS_KERNEL", "linear")],
                         ids=["official", "ours", "pure_postnorm_linear"])
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
