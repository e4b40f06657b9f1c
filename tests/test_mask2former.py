"""Mask2Former on the query-based mask meta-architecture (QuerySegmentor): masked attention,
point-sampled matching costs, deep supervision, boxes from masks, the official checkpoint
converter, the LSJ mapper, the tiny config overfitting one image, DefaultPredictor output,
code defaults = the COCO yaml, and the interface a FastInst-like decoder plugs into."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import maskfrozen  # noqa: F401  (registers the models)
from conftest import REPO, make_cfg, overfit_loss_history
from maskfrozen.layers import CrossAttentionLayer
from maskfrozen.modeling.criterion import HungarianMatcher, QuerySet
from maskfrozen.modeling.criterion.mask_losses import dice_cost, sigmoid_bce_cost
from maskfrozen.modeling.query_seg import DecoderOutput
from maskfrozen.modeling.query_seg.mask2former import MultiScaleMaskedTransformerDecoder, attention_mask_from_masks
from maskfrozen.modeling.registries import TRANSFORMER_DECODER_REGISTRY

TINY = os.path.join(REPO, "configs", "shapes", "mask2former", "maskformer2_R18_tiny.yaml")
COCO = os.path.join(REPO, "configs", "coco", "mask2former", "maskformer2_R50_bs16_50ep.yaml")


def tiny_model(tmp_path, *opts):
    return build_model(make_cfg(TINY, tmp_path, *opts))


def synthetic_inputs(n: int = 2, size: int = 128):
    """Images with two rectangles each (one per class 0 / 1) as detectron2 training inputs."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 10:50, 20:70] = True
        masks[1, 70:120, 60:110] = True
        inst = Instances((size, size), gt_classes=torch.tensor([0, 1]), gt_masks=BitMasks(masks))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        image = torch.randint(0, 60, (3, size, size), dtype=torch.uint8, generator=g)
        image[:, masks[0]] = 220
        image[2, masks[1]] = 250
        inputs.append({"image": image, "height": size, "width": size, "instances": inst})
    return inputs


# ---------------------------------------------------------------------- masked attention
def test_masked_attention_zero_weight_outside_mask_and_all_masked_row_attends_everywhere():
    """Query 0's mask covers the left half of a 4 x 4 map: its attention weights on the right
    half are 0 and changing the memory there leaves its output unchanged. Query 1's mask is
    empty (every position masked): the row is cleared and it attends everywhere."""
    torch.manual_seed(0)
    nhead, c = 2, 8
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :, :2] = 5.0
    attn_mask = attention_mask_from_masks(logits, (4, 4), nhead)
    assert attn_mask.shape == (nhead, 2, 16)
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    assert torch.equal(attn_mask[0, 0], ~left.flatten()) and not attn_mask[:, 1].any()

    layer = CrossAttentionLayer(c, nhead).eval()
    x, memory = torch.randn(1, 2, c), torch.randn(1, 16, c)
    _, weights = layer.attn(x, memory, memory, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    assert torch.all(weights[0, :, 0, ~left.flatten()] == 0) and torch.all(weights[0, :, 0, left.flatten()] > 0)
    assert torch.all(weights[0, :, 1] > 0)
    changed = memory.clone()
    changed[0, ~left.flatten()] += 3.0
    out, out_changed = layer(x, memory, attn_mask=attn_mask), layer(x, changed, attn_mask=attn_mask)
    assert torch.allclose(out[0, 0], out_changed[0, 0], atol=1e-6)
    assert not torch.allclose(out[0, 1], out_changed[0, 1], atol=1e-3)


def test_attention_mask_resized_from_the_previous_prediction():
    """A 1/4 prediction is resized to the coarser level before thresholding at 0.5."""
    logits = torch.full((1, 1, 8, 8), -5.0)
    logits[0, 0, :4, :4] = 5.0
    mask = attention_mask_from_masks(logits, (2, 2), 1)
    assert mask.view(2, 2).tolist() == [[False, True], [True, True]]


def test_attention_mask_dilation_opens_the_ring_around_the_mask_and_extra_queries_attend_everywhere():
    """One query's mask = the centre cell of 5 x 5: dilation 1 allows the 3 x 3 block around
    it (the other cells stay masked); an extra (auxiliary) query row is all False."""
    logits = torch.full((1, 1, 5, 5), -5.0)
    logits[0, 0, 2, 2] = 5.0
    allowed = ~attention_mask_from_masks(logits, (5, 5), 2, extra_queries=1, dilation=1)
    assert allowed.shape == (2, 2, 25) and torch.equal(allowed[0], allowed[1])  # repeated per head
    ring = torch.zeros(5, 5, dtype=torch.bool)
    ring[1:4, 1:4] = True
    assert torch.equal(allowed[0, 0].view(5, 5), ring) and bool(allowed[0, 1].all())
    assert int((~attention_mask_from_masks(logits, (5, 5), 1)).sum()) == 1  # dilation 0: the paper's


# ---------------------------------------------------------------------- matching costs
def test_point_sampled_matcher_cost_close_to_dense_cost():
    """The matcher's point-sampled BCE / dice costs (uniform random points shared by the
    image's queries and targets) estimate the dense costs computed by hand over all pixels
    (exact equality at given points: tests/test_matcher_criterion.py)."""
    torch.manual_seed(0)
    size = 32
    # smooth logits (a 4 x 4 field upsampled): bilinear reads between pixels match the pixels
    pred = torch.nn.functional.interpolate(torch.randn(3, 1, 4, 4) * 3, size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0]
    gt = torch.zeros(2, size, size, dtype=torch.bool)
    gt[0, 4:20, 4:20] = True
    gt[1, 10:30, 16:28] = True
    dense_bce = sigmoid_bce_cost(pred.flatten(1), gt.flatten(1).float())
    dense_dice = dice_cost(pred.flatten(1), gt.flatten(1).float())
    matcher = HungarianMatcher({"mask": 1.0}, class_cost="softmax", num_mask_points=20000)
    outputs = {"pred_masks": pred, "pred_logits": torch.zeros(3, 6)}
    sampled = matcher.cost_matrix(outputs, {"labels": torch.tensor([0, 1]), "masks": gt})
    assert torch.allclose(sampled, dense_bce, rtol=0.05, atol=0.02)
    dice_matcher = HungarianMatcher({"dice": 1.0}, class_cost="softmax", num_mask_points=20000)
    sampled_dice = dice_matcher.cost_matrix(outputs, {"labels": torch.tensor([0, 1]), "masks": gt})
    assert torch.allclose(sampled_dice, dense_dice, rtol=0.05, atol=0.02)


# ---------------------------------------------------------------------- training
def test_deep_supervision_losses_for_every_layer(tmp_path, one_thread):
    """DEC_LAYERS 3 = 2 layers + the learnable queries: 3 predictions, each with class, mask
    and dice losses; DEEP_SUPERVISION False keeps only the last layer's."""
    model = tiny_model(tmp_path).train()
    losses = model(synthetic_inputs())
    expected = {f"loss_{t}{s}" for t in ("class", "mask", "dice") for s in ("", "_aux0", "_aux1")}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    model = tiny_model(tmp_path, "MODEL.MASK_FORMER.DEEP_SUPERVISION", "False").train()
    assert set(model(synthetic_inputs())) == {"loss_class", "loss_mask", "loss_dice"}


def test_tiny_config_overfits_one_image(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_model(tmp_path).train()
    batch = synthetic_inputs(1)
    history = overfit_loss_history(model, batch, steps=30, lr=1e-3)
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history


# ---------------------------------------------------------------------- inference
def test_predictions_carry_boxes_enclosing_their_masks_at_the_output_size(tmp_path, one_thread):
    """Input 128 x 128 reported at 256 x 192: masks at the output size, boxes non-zero and
    enclosing each mask, at most TEST.DETECTIONS_PER_IMAGE instances, scores sorted."""
    torch.manual_seed(0)
    model = tiny_model(tmp_path, "TEST.DETECTIONS_PER_IMAGE", "15").eval()
    x = synthetic_inputs(1)[0]
    with torch.no_grad():
        inst = model([{"image": x["image"], "height": 256, "width": 192}])[0]["instances"]
    assert 0 < len(inst) <= 15 and inst.image_size == (256, 192)
    assert inst.pred_masks.shape[1:] == (256, 192) and inst.pred_masks.dtype == torch.bool
    boxes = inst.pred_boxes.tensor
    for mask, box in zip(inst.pred_masks, boxes):
        if mask.any():
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[2] > box[0] and box[3] > box[1]
            assert box[0] <= xs.min() + 2 and box[1] <= ys.min() + 2
            assert box[2] >= xs.max() - 1 and box[3] >= ys.max() - 1
    assert (boxes.abs().sum(1) > 0).any()


def test_boxes_ignore_stray_fragments_only_when_asked():
    """A 20 x 30 blob and a 3 x 3 fragment far away (1.5 % of the area), a mask of two halves
    (50 / 50) and an empty mask, at 400 x 500 (components found on a 4 x 4-pixel grid): share 0
    (the default) gives tight boxes around everything; share 0.1 drops the fragment but keeps
    both halves; share 1 keeps the largest component only (both when two tie); empty masks give
    zero boxes."""
    from maskfrozen.modeling.postprocess import boxes_from_masks, main_components

    masks = torch.zeros(3, 400, 500, dtype=torch.bool)
    masks[0, 100:120, 200:230] = True  # main blob: 600 px
    masks[0, 350:353, 20:23] = True  # fragment: 9 px
    masks[1, 10:30, 10:30] = True
    masks[1, 10:30, 300:320] = True  # a second half as large as the first
    tight = boxes_from_masks(masks).tensor.tolist()
    assert tight == [[20, 100, 230, 353], [10, 10, 320, 30], [0, 0, 0, 0]]
    assert boxes_from_masks(masks, 0.1).tensor.tolist() == [[200, 100, 230, 120], [10, 10, 320, 30], [0, 0, 0, 0]]
    assert boxes_from_masks(masks, 1.0).tensor.tolist()[0] == [200, 100, 230, 120]
    assert boxes_from_masks(masks, 1.0).tensor.tolist()[1] == [10, 10, 320, 30]  # equal largest halves: both kept
    assert torch.equal(main_components(masks, 0.1)[0], masks[0] & (torch.arange(400) < 200)[:, None])
    with pytest.raises(ValueError, match="min_share must be in"):
        main_components(masks, 1.5)


def test_all_top_k_pairs_kept_even_with_empty_masks_unless_postprocessing_at_input_size(tmp_path, one_thread):
    """Every mask forced empty (constant negative logits): the official post-processing keeps
    all TEST.DETECTIONS_PER_IMAGE pairs (score 0, empty masks, zero boxes) at the output size;
    our POSTPROCESS_AT_INPUT_SIZE variant drops detections whose mask is empty."""
    torch.manual_seed(0)
    x = synthetic_inputs(1)[0]
    batch = [{"image": x["image"], "height": 200, "width": 160}]
    counts = {}
    for at_input in (False, True):
        model = tiny_model(tmp_path, "TEST.DETECTIONS_PER_IMAGE", "12",
                           "MODEL.MASK_FORMER.TEST.POSTPROCESS_AT_INPUT_SIZE", str(at_input)).eval()
        with torch.no_grad():
            model.pixel_decoder.mask_features.weight.zero_()
            model.pixel_decoder.mask_features.bias.fill_(1.0)
            last = model.transformer_decoder.mask_embed.layers[-1]
            last.weight.zero_()
            last.bias.fill_(-1.0)
            inst = model(batch)[0]["instances"]
        assert inst.image_size == (200, 160)
        counts[at_input] = len(inst)
        if not at_input:
            assert not inst.pred_masks.any() and inst.pred_masks.shape == (12, 200, 160)
            assert inst.scores.abs().sum() == 0 and inst.pred_boxes.tensor.abs().sum() == 0
    assert counts == {False: 12, True: 0}


def test_default_predictor_output_at_the_input_image_size(tmp_path, one_thread):
    from detectron2.engine import DefaultPredictor

    cfg = make_cfg(TINY, tmp_path).clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    inst = predictor(image)["instances"]
    assert inst.image_size == (100, 150) and inst.pred_masks.shape[1:] == (100, 150)
    assert {"pred_masks", "pred_boxes", "scores", "pred_classes"} <= set(inst.get_fields())
    assert isinstance(inst.pred_boxes, Boxes)


# ---------------------------------------------------------------------- interface
@TRANSFORMER_DECODER_REGISTRY.register()
class _GuidedDecoderForTest(MultiScaleMaskedTransformerDecoder):
    """What FastInst does through the interface: a fixed-assignment set from the last
    layer's Hungarian indices (via the matcher it is given) and an extra weighted loss."""

    seen_training = []

    def forward(self, pixels, training=None):
        out = super().forward(pixels, training)
        type(self).seen_training.append(training is not None)
        if training is None:
            return out
        indices = training.matcher(out.outputs, training.targets)
        guided = {k: v for k, v in out.outputs.items() if k != "aux_outputs"}
        extra = QuerySet(guided, "_gt", indices=indices)
        return DecoderOutput(out.outputs, [extra], {"loss_proposal": out.outputs["pred_logits"].sum() * 0.0})


def test_a_decoder_plugs_extra_query_sets_and_losses_without_touching_the_meta_arch(tmp_path, one_thread):
    model = tiny_model(tmp_path, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "_GuidedDecoderForTest").train()
    losses = model(synthetic_inputs())
    assert {"loss_class_gt", "loss_mask_gt", "loss_dice_gt", "loss_proposal", "loss_dice_aux1"} <= set(losses)
    model.eval()
    with torch.no_grad():
        model([{"image": synthetic_inputs(1)[0]["image"]}])
    assert _GuidedDecoderForTest.seen_training[-2:] == [True, False]


def test_unknown_decoder_name_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME='Nope'"):
        tiny_model(tmp_path, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "Nope")


# ---------------------------------------------------------------------- configs
def test_code_defaults_equal_the_coco_yaml(tmp_path):
    cfg = make_cfg(COCO, tmp_path)
    defaults = get_cfg()
    maskfrozen.add_maskfrozen_config(defaults)
    assert dict(cfg.MODEL.MASK_FORMER) == dict(defaults.MODEL.MASK_FORMER)
    ours = [k for k in cfg.MODEL.SEM_SEG_HEAD if k not in get_cfg().MODEL.SEM_SEG_HEAD]
    assert len(ours) == 7 and all(cfg.MODEL.SEM_SEG_HEAD[k] == defaults.MODEL.SEM_SEG_HEAD[k] for k in ours)
    assert (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE) == (1024, 0.1, 2.0)
    m, s = cfg.MODEL.MASK_FORMER, cfg.SOLVER
    assert (m.NUM_OBJECT_QUERIES, m.DEC_LAYERS, m.CLASS_WEIGHT, m.MASK_WEIGHT, m.DICE_WEIGHT,
            m.NO_OBJECT_WEIGHT, m.TRAIN_NUM_POINTS) == (100, 10, 2.0, 5.0, 5.0, 0.1, 12544)
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER, s.IMS_PER_BATCH, s.MAX_ITER) == (
        "ADAMW", 1e-4, 0.05, 0.1, 16, 368750)
    assert (s.CLIP_GRADIENTS.CLIP_TYPE, s.CLIP_GRADIENTS.CLIP_VALUE) == ("full_model", 0.01)
    assert cfg.INPUT.DATASET_MAPPER_NAME == "coco_instance_lsj" and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 80


def test_coco_model_has_the_published_architecture(tmp_path):
    model = build_model(make_cfg(COCO, tmp_path, "MODEL.DEVICE", "cpu"))
    dec, pix = model.transformer_decoder, model.pixel_decoder
    assert len(dec.cross_attention_layers) == 9 and dec.query_feat.weight.shape == (100, 256)
    assert dec.class_embed.out_features == 81 and len(pix.encoder.layers) == 6
    assert pix.transformer_in_features == ["res5", "res4", "res3"] and pix.fpn_features == ["res2"]


# ---------------------------------------------------------------------- converter
def official_state_dict(model, cfg) -> dict:
    """Every key of an official Mask2Former instance checkpoint, with its official shape
    (names and shapes from facebookresearch/Mask2Former's MSDeformAttnPixelDecoder and
    MultiScaleMaskedTransformerDecoder), random values; the backbone keys are detectron2's."""
    h, m = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
    c, d, heads, pts = h.CONVS_DIM, m.HIDDEN_DIM, h.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS, 4
    shapes = {k: v.shape for k, v in model.backbone.state_dict().items() if "num_batches" not in k}
    sd = {f"backbone.{k}": s for k, s in shapes.items()}
    pd, channels = "sem_seg_head.pixel_decoder.", [512, 1024, 2048] if cfg.MODEL.RESNETS.DEPTH == 50 else None
    channels = channels or [model.backbone.output_shape()[f].channels for f in ("res5", "res4", "res3")][::-1]
    for i, cin in enumerate(channels[::-1]):  # res5, res4, res3
        sd.update({f"{pd}input_proj.{i}.0.weight": (c, cin, 1, 1), f"{pd}input_proj.{i}.0.bias": (c,),
                   f"{pd}input_proj.{i}.1.weight": (c,), f"{pd}input_proj.{i}.1.bias": (c,)})
    sd[f"{pd}transformer.level_embed"] = (3, c)
    for i in range(h.TRANSFORMER_ENC_LAYERS):
        p = f"{pd}transformer.encoder.layers.{i}."
        for name, rows in (("sampling_offsets", heads * 3 * pts * 2), ("attention_weights", heads * 3 * pts),
                           ("value_proj", c), ("output_proj", c)):
            sd.update({f"{p}self_attn.{name}.weight": (rows, c), f"{p}self_attn.{name}.bias": (rows,)})
        ffn = h.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD
        sd.update({f"{p}linear1.weight": (ffn, c), f"{p}linear1.bias": (ffn,), f"{p}linear2.weight": (c, ffn),
                   f"{p}linear2.bias": (c,)})
        sd.update({f"{p}{n}.{w}": (c,) for n in ("norm1", "norm2") for w in ("weight", "bias")})
    res2 = model.backbone.output_shape()["res2"].channels
    sd.update({f"{pd}mask_features.weight": (h.MASK_DIM, c, 1, 1), f"{pd}mask_features.bias": (h.MASK_DIM,),
               f"{pd}adapter_1.weight": (c, res2, 1, 1), f"{pd}layer_1.weight": (c, c, 3, 3)})
    sd.update({f"{pd}{n}.norm.{w}": (c,) for n in ("adapter_1", "layer_1") for w in ("weight", "bias")})
    pr = "sem_seg_head.predictor."
    for i in range(m.DEC_LAYERS - 1):
        for group, attn in (("transformer_self_attention_layers", "self_attn"),
                            ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{pr}{group}.{i}."
            sd.update({f"{p}{attn}.in_proj_weight": (3 * d, d), f"{p}{attn}.in_proj_bias": (3 * d,),
                       f"{p}{attn}.out_proj.weight": (d, d), f"{p}{attn}.out_proj.bias": (d,),
                       f"{p}norm.weight": (d,), f"{p}norm.bias": (d,)})
        p, f = f"{pr}transformer_ffn_layers.{i}.", m.DIM_FEEDFORWARD
        sd.update({f"{p}linear1.weight": (f, d), f"{p}linear1.bias": (f,), f"{p}linear2.weight": (d, f),
                   f"{p}linear2.bias": (d,), f"{p}norm.weight": (d,), f"{p}norm.bias": (d,)})
    k, q = h.NUM_CLASSES, m.NUM_OBJECT_QUERIES
    sd.update({f"{pr}decoder_norm.weight": (d,), f"{pr}decoder_norm.bias": (d,), f"{pr}query_feat.weight": (q, d),
               f"{pr}query_embed.weight": (q, d), f"{pr}level_embed.weight": (3, d),
               f"{pr}class_embed.weight": (k + 1, d), f"{pr}class_embed.bias": (k + 1,),
               "criterion.empty_weight": (k + 1,)})
    for j, (rows, cols) in enumerate([(d, d), (d, d), (h.MASK_DIM, d)]):
        sd.update({f"{pr}mask_embed.layers.{j}.weight": (rows, cols), f"{pr}mask_embed.layers.{j}.bias": (rows,)})
    if c != d:
        sd.update({f"{pr}input_proj.{i}.{w}": s for i in range(3) for w, s in (("weight", (d, c, 1, 1)),
                                                                               ("bias", (d,)))})
    return {key: torch.randn(shape) for key, shape in sd.items()}


@pytest.mark.parametrize("config,opts", [(COCO, ()), (TINY, ()), (TINY, ("MODEL.SEM_SEG_HEAD.CONVS_DIM", "64"))],
                         ids=["coco_R50", "tiny", "tiny_input_proj"])
def test_converter_round_trips_every_official_key(tmp_path, config, opts):
    from maskfrozen.checkpoint.mask2former_converter import convert_mask2former_state_dict

    cfg = make_cfg(config, tmp_path, "MODEL.DEVICE", "cpu", *opts)
    model = build_model(cfg)
    source = official_state_dict(model, cfg)
    target = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    converted, report = convert_mask2former_state_dict(source, target)
    assert report.unused_source_keys == [] and report.unmatched_target_keys == []
    assert report.dropped_aliases == ["criterion.empty_weight"] and len(converted) == len(target)
    for src, dst in report.renamed.items():
        assert converted[dst] is source[src]
    model.load_state_dict(converted, strict=False)
    assert torch.equal(model.transformer_decoder.query_feat.weight, source["sem_seg_head.predictor.query_feat.weight"])


def test_converter_names_every_shape_mismatch(tmp_path):
    from maskfrozen.checkpoint.mask2former_converter import convert_mask2former_state_dict

    cfg = make_cfg(TINY, tmp_path)
    model = build_model(cfg)
    source = official_state_dict(model, cfg)
    source["sem_seg_head.predictor.class_embed.weight"] = torch.zeros(81, 32)
    with pytest.raises(ValueError, match=r"class_embed.weight: checkpoint \(81, 32\) vs model \(6, 32\)"):
        convert_mask2former_state_dict(source, model.state_dict())


# ---------------------------------------------------------------------- LSJ mapper
def test_drop_empty_masks_after_the_crop():
    from maskfrozen.data.lsj_mapper import drop_empty_masks

    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[2, 10:12, 10:16] = True
    inst = Instances((16, 16), gt_classes=torch.tensor([0, 1, 2]), gt_masks=BitMasks(masks))
    kept = drop_empty_masks(inst)
    assert kept.gt_classes.tolist() == [0, 2]
    assert kept.gt_boxes.tensor.tolist() == [[3.0, 2.0, 9.0, 5.0], [10.0, 10.0, 16.0, 12.0]]


def test_lsj_mapper_gives_fixed_size_images_and_non_empty_masks(tmp_path):
    from detectron2.data import DatasetCatalog

    from maskfrozen.data.datasets import ensure_dataset_files
    from maskfrozen.data.mappers import build_mapper

    cfg = make_cfg(TINY, tmp_path, "INPUT.DATASET_MAPPER_NAME", "coco_instance_lsj", "INPUT.IMAGE_SIZE", "96")
    ensure_dataset_files("shapes_tiny_train")
    record = DatasetCatalog.get("shapes_tiny_train")[0]
    mapper = build_mapper(cfg, is_train=True)
    for _ in range(4):
        out = mapper(record)
        inst = out["instances"]
        assert out["image"].shape == (3, 96, 96) and inst.image_size == (96, 96)
        assert isinstance(inst.gt_masks, BitMasks) and bool(inst.gt_masks.tensor.flatten(1).any(1).all())
    assert build_mapper(cfg, is_train=False).__class__.__name__ == "CheckedDatasetMapper"


def test_convert_checkpoint_tool_reads_an_official_pkl(tmp_path):
    """tools/convert_checkpoint.py --format mask2former: a model-zoo style .pkl (pickled numpy
    arrays under "model") converts with --allow-pickle into a checkpoint the model loads strictly;
    without --allow-pickle it is refused and nothing is written."""
    import pickle
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    cfg = make_cfg(TINY, tmp_path)
    model = build_model(cfg)
    source = {k: v.numpy() for k, v in official_state_dict(model, cfg).items()}
    pkl, out = tmp_path / "model_final_test.pkl", tmp_path / "converted.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": source, "__author__": "test"}, f)
    args = ["--format", "mask2former", "--config-file", TINY, str(pkl), str(out)]
    with pytest.raises(SystemExit, match="--allow-pickle"):
        convert_checkpoint.main(args)
    assert not out.exists()
    report = convert_checkpoint.main(["--allow-pickle", *args])
    assert report.unmatched_target_keys == [] and report.unused_source_keys == []
    state = torch.load(out, weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    key = "sem_seg_head.predictor.mask_embed.layers.2.weight"
    assert np.array_equal(model.transformer_decoder.mask_embed.layers[2].weight.detach().numpy(), source[key])
