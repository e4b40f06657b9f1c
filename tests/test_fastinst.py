"""FastInst on the query-based mask meta-architecture: the 8-neighbour local-maximum filter,
the query selection, the location cost, the proposal loss, the GT-mask-guided set (last
layer's assignment, training only), auxiliary queries, inference with / without the guided
branch, the tiny config overfitting one image, DefaultPredictor output with real boxes, the
fastinst_instance mapper and code defaults = the COCO yaml."""
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

import maskfrozen  # noqa: F401  (registers the models)
from conftest import REPO, make_cfg, overfit_loss_history
from maskfrozen.modeling.criterion import HungarianMatcher, location_cost
from maskfrozen.modeling.query_seg.fastinst import (InstanceActivationQueries, grid_locations, local_maxima,
                                                    proposal_loss)
from test_mask2former import synthetic_inputs

TINY = os.path.join(REPO, "configs", "shapes", "fastinst", "fastinst_R18_tiny.yaml")
D1 = os.path.join(REPO, "configs", "coco", "fastinst", "fastinst_R50_ppm-fpn_x1_576.yaml")
D3 = os.path.join(REPO, "configs", "coco", "fastinst", "fastinst_R50_ppm-fpn_x3_640.yaml")


def tiny_model(tmp_path, *opts):
    return build_model(make_cfg(TINY, tmp_path, *opts))


# ---------------------------------------------------------------------- IA-guided queries
def test_local_maxima_keeps_exactly_the_8_neighbour_maxima():
    """Maxima: the 0.9 peak, the 0.5 plateau pair (ties count), the 0.3 corner (borders count
    as 0); the 0.4 cell is beaten by its diagonal 0.9 neighbour; zeros are never maxima."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3],
                      [0.0, 0.9, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.4, 0.0, 0.0],
                      [0.5, 0.5, 0.0, 0.0, 0.0]])[None, None]
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[1, 1] = expected[0, 4] = expected[3, 0] = expected[3, 1] = True
    assert torch.equal(local_maxima(x)[0, 0], expected)


class _Constant(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, _):
        return self.value


def test_queries_are_the_top_local_maxima_of_the_argmax_class():
    """3 classes + background on a 4 x 4 map. (0, 0) peaks in class 0 and its neighbour (1, 1)
    has a higher class-0 logit, but (1, 1)'s arg-max class is 1, so it does not suppress
    (0, 0); (2, 2) is class 1 with a lower probability than its diagonal neighbour (1, 1): not
    a maximum. Scores = p + 1 for maxima; two queries = the two highest peaks."""
    proposal = InstanceActivationQueries(channels=2, num_queries=2, num_classes=3)
    logits = torch.full((1, 4, 4, 4), -5.0)
    logits[0, 3] = 0.0  # background everywhere
    logits[0, 0, 0, 0] = 3.0  # class 0 peak: p = 0.95
    logits[0, 0, 1, 1], logits[0, 1, 1, 1] = 3.5, 4.0  # class 1 wins at (1, 1): p = 0.62
    logits[0, 2, 3, 3] = 2.0  # class 2 peak: p = 0.88
    logits[0, 1, 2, 2] = 0.3  # class 1, p = 0.57 < 0.62 of (1, 1)
    scores = proposal.activation_scores(logits)[0].view(4, 4)
    p = logits[0].softmax(0)
    assert scores[0, 0].item() == pytest.approx(1 + p[0, 0, 0].item())
    assert scores[1, 1].item() == pytest.approx(1 + p[1, 1, 1].item())
    assert scores[2, 2].item() == pytest.approx(p[1, 2, 2].item())  # not a maximum: no +1
    assert scores.flatten().topk(3).indices.tolist() == [0, 15, 5]
    x = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4)
    proposal.conv_proposal_cls_logits = _Constant(logits)  # the selection only
    out = proposal(x, torch.zeros(2, 4, 4))
    assert out.index.tolist() == [[0, 15]]
    assert out.features[0].tolist() == [[0.0, 16.0], [15.0, 31.0]]
    assert out.locations[0].tolist() == [[0.0, 0.0], [1.0, 1.0]]  # official: linspace(0, 1, 4) per axis
    proposal.cell_centre_locations = True  # ours (MODEL.FASTINST.LOCATIONS_AT_CELL_CENTRES)
    assert proposal(x, torch.zeros(2, 4, 4)).locations[0].tolist() == [[0.125, 0.125], [0.875, 0.875]]


def test_location_cost_zero_inside_penalised_outside_a_hand_made_mask():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 1:4] = 1  # rows 2-5, columns 1-3
    locations = torch.tensor([[2.5 / 8, 3.5 / 8], [6.5 / 8, 3.5 / 8], [1.5 / 8, 0.5 / 8]])  # inside, right, above
    assert location_cost(locations, mask).flatten().tolist() == [-1.0, 0.0, 0.0]
    matcher = HungarianMatcher({"class": 1.0, "location": 1000.0}, class_cost="softmax")
    logits = torch.tensor([[[0.0, 0.0], [5.0, 0.0], [5.0, 0.0]]])  # the outside queries are more confident
    (query, target), = matcher({"pred_logits": logits, "query_locations": locations[None]},
                               [{"labels": torch.tensor([0]), "masks": mask}])
    assert query.tolist() == [0] and target.tolist() == [0]


def test_proposal_loss_is_a_plain_mean_over_pixels_with_the_matched_pixel_labelled():
    """One GT (class 1) covering cells of a 2 x 2 grid's right column: the matched pixel is the
    one inside the mask with the highest class-1 probability; the loss = mean CE over the 4
    pixels (background everywhere else), by hand."""
    logits = torch.zeros(1, 3, 2, 2)  # K = 2 classes + background
    logits[0, 1, 1, 1] = 2.0  # pixel (1, 1): likes class 1
    logits[0, 1, 0, 0] = 4.0  # pixel (0, 0) likes it more but lies outside the mask
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :, 20:] = True
    target = [{"labels": torch.tensor([1]), "masks": masks}]
    matcher = HungarianMatcher({"class": 2.0, "location": 1000.0}, class_cost="softmax")
    loss = proposal_loss(logits, target, matcher)
    pixels = logits.flatten(2)[0].t()
    labels = torch.tensor([2, 2, 2, 1])  # row-major: (0,0) (0,1) (1,0) (1,1)
    expected = torch.nn.functional.cross_entropy(pixels, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert grid_locations(2, 2).tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert grid_locations(2, 2, cell_centres=True).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


# ---------------------------------------------------------------------- decoder
def test_gt_guided_set_uses_the_last_layers_assignment_and_only_in_training(tmp_path, one_thread, monkeypatch):
    """The guided set's indices are the matcher's result on the last layer's outputs (with
    the query locations); the criterion gets it as a fixed assignment for every layer; at
    inference the decoder returns no extra sets or losses; GT_GUIDED False drops the set."""
    torch.manual_seed(0)
    model = tiny_model(tmp_path).train()
    decoder, calls = model.transformer_decoder, []
    real_matcher_forward = type(model.criterion.matcher).forward

    def spy(matcher, outputs, targets):
        indices = real_matcher_forward(matcher, outputs, targets)
        if matcher is model.criterion.matcher:  # not the proposal matcher
            calls.append((outputs, indices))
        return indices

    monkeypatch.setattr(type(model.criterion.matcher), "forward", spy)
    from maskfrozen.modeling.query_seg import TrainingInputs

    images = model.preprocess_image(synthetic_inputs())
    pixels = model.pixel_decoder(model.backbone(images.tensor))
    targets = model.prepare_targets(synthetic_inputs(), images)
    out = decoder(pixels, TrainingInputs(targets, model.criterion.matcher))
    guided = out.extra_query_sets[0]
    assert len(calls) == 1
    first_call_outputs, first_call_indices = calls[0]
    assert first_call_outputs is not out.outputs and torch.equal(first_call_outputs["pred_masks"],
                                                                out.outputs["pred_masks"])
    assert "query_locations" in first_call_outputs
    assert guided.suffix == "_gt" and guided.indices is first_call_indices
    assert len(guided.outputs["aux_outputs"]) == len(decoder.layers) - 1
    assert set(out.extra_losses) == {"loss_proposal"}
    losses = model(synthetic_inputs())
    assert {"loss_class_gt", "loss_mask_gt", "loss_dice_gt", "loss_dice_gt_aux0", "loss_proposal"} <= set(losses)
    model.eval()
    with torch.no_grad():
        evaluated = decoder(pixels)
    assert evaluated.extra_query_sets == [] and evaluated.extra_losses == {}
    assert "aux_outputs" not in evaluated.outputs
    unguided = tiny_model(tmp_path, "MODEL.FASTINST.GT_GUIDED", "False").train()
    assert not any(k.endswith("_gt") or "_gt_" in k for k in unguided(synthetic_inputs()))


def test_gt_guided_pass_runs_each_layer_on_its_output_or_with_the_option_on_its_input(tmp_path, one_thread):
    """Each layer runs twice in training: the normal pass, then the GT-guided one. Official:
    the guided call of layer i takes the normal call's OUTPUT (Q_i, X_i); with
    MODEL.FASTINST.GT_GUIDED_ON_LAYER_INPUT (ours), its INPUT (Q_{i-1}, X_{i-1})."""
    for on_input in (False, True):
        torch.manual_seed(0)
        model = tiny_model(tmp_path, "MODEL.FASTINST.GT_GUIDED_ON_LAYER_INPUT", str(on_input)).train()
        calls = {i: [] for i in range(len(model.transformer_decoder.layers))}
        for i, layer in enumerate(model.transformer_decoder.layers):
            layer.register_forward_hook(lambda m, args, out, i=i: calls[i].append((args[0], out)))
        with torch.no_grad():
            model(synthetic_inputs())
        for (normal_in, normal_out), (guided_in, _) in calls.values():
            expected = normal_in if on_input else normal_out
            assert all(torch.equal(a, b) for a, b in zip(guided_in, expected))
            assert not torch.equal(normal_in[0], normal_out[0])


def test_all_top_k_pairs_kept_even_when_every_mask_is_empty(tmp_path, one_thread):
    """The last head's masks forced empty: all TEST.DETECTIONS_PER_IMAGE (query, class) pairs
    are reported (score 0, empty mask, zero box) as the official FastInst does (the old
    post-processing dropped them: MODEL.MASK_FORMER.TEST.POSTPROCESS_AT_INPUT_SIZE)."""
    torch.manual_seed(0)
    model = tiny_model(tmp_path, "TEST.DETECTIONS_PER_IMAGE", "20").eval()
    head = model.transformer_decoder.heads[-1]
    with torch.no_grad():
        head.pixel_proj.weight.zero_()
        head.pixel_proj.bias.fill_(1.0)
        head.mask_embed.layers[-1].weight.zero_()
        head.mask_embed.layers[-1].bias.fill_(-1.0)
        inst = model([{"image": synthetic_inputs(1)[0]["image"], "height": 90, "width": 100}])[0]["instances"]
    assert len(inst) == 20 and inst.image_size == (90, 100) and not inst.pred_masks.any()
    assert inst.scores.abs().sum() == 0 and inst.pred_boxes.tensor.abs().sum() == 0


def test_auxiliary_queries_produce_no_predictions_but_take_part(tmp_path, one_thread):
    """10 predicting queries + 2 auxiliary: outputs have 10 rows; changing an auxiliary query
    changes the predictions (they are in the self-attention), yet never adds rows."""
    torch.manual_seed(0)
    model = tiny_model(tmp_path).eval()
    batch = [{"image": synthetic_inputs(1)[0]["image"]}]
    decoder = model.transformer_decoder
    with torch.no_grad():
        images = model.preprocess_image(batch)
        pixels = model.pixel_decoder(model.backbone(images.tensor))
        before = decoder(pixels).outputs
        decoder.aux_query_feat.weight.add_(1.0)
        after = decoder(pixels).outputs
    assert before["pred_logits"].shape == (1, 10, 6) and before["pred_masks"].shape[:2] == (1, 10)
    assert not torch.allclose(before["pred_logits"], after["pred_logits"])


def test_inference_identical_with_and_without_the_gt_guided_branch(tmp_path, one_thread):
    torch.manual_seed(0)
    guided = tiny_model(tmp_path).eval()
    plain = tiny_model(tmp_path, "MODEL.FASTINST.GT_GUIDED", "False").eval()
    assert guided.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(guided.state_dict())
    batch = [{"image": x["image"]} for x in synthetic_inputs(2)]
    with torch.no_grad():
        a, b = guided(batch), plain(batch)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_masks, y.pred_masks)
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)


def test_only_the_last_class_head_runs_at_inference(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_model(tmp_path).eval()
    ran = []
    for j, head in enumerate(model.transformer_decoder.heads):
        head.class_embed.register_forward_hook(lambda *_, j=j: ran.append(j))
    with torch.no_grad():
        model([{"image": synthetic_inputs(1)[0]["image"]}])
    assert ran == [len(model.transformer_decoder.heads) - 1]


def test_too_few_pixels_for_the_queries_is_an_error(tmp_path):
    model = tiny_model(tmp_path, "MODEL.FASTINST.NUM_OBJECT_QUERIES", "70").eval()  # 128 px -> 8 x 8 = 64
    with pytest.raises(ValueError, match="fewer pixels than NUM_OBJECT_QUERIES=70"):
        with torch.no_grad():
            model([{"image": synthetic_inputs(1)[0]["image"]}])


# ---------------------------------------------------------------------- training / inference
def test_tiny_config_overfits_one_image(tmp_path, one_thread):
    torch.manual_seed(0)
    model = tiny_model(tmp_path).train()
    batch = synthetic_inputs(1)
    history = overfit_loss_history(model, batch, steps=30, lr=1e-3)
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:5]), history


def test_default_predictor_output_with_real_boxes_at_the_input_size(tmp_path, one_thread):
    from detectron2.engine import DefaultPredictor

    torch.manual_seed(0)
    cfg = make_cfg(TINY, tmp_path).clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    inst = predictor(image)["instances"]
    assert inst.image_size == (100, 150) and inst.pred_masks.shape[1:] == (100, 150)
    assert isinstance(inst.pred_boxes, Boxes)
    for mask, box in zip(inst.pred_masks, inst.pred_boxes.tensor):
        if mask.any():
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[0] <= xs.min() + 1 and box[2] >= xs.max() and box[1] <= ys.min() + 1 and box[3] >= ys.max()
    assert (inst.pred_boxes.tensor.abs().sum(1) > 0).any()


# ---------------------------------------------------------------------- configs / data
def test_code_defaults_equal_the_coco_d1_yaml_and_d3_differs_in_layers_only(tmp_path):
    d1, d3 = make_cfg(D1, tmp_path), make_cfg(D3, tmp_path)
    defaults = get_cfg()
    maskfrozen.add_maskfrozen_config(defaults)
    assert dict(d1.MODEL.FASTINST) == dict(defaults.MODEL.FASTINST)
    assert dict(d1.MODEL.MASK_FORMER, TRANSFORMER_DECODER_NAME="x") == dict(defaults.MODEL.MASK_FORMER,
                                                                             TRANSFORMER_DECODER_NAME="x")
    assert {k: v for k, v in d3.MODEL.FASTINST.items() if v != d1.MODEL.FASTINST[k]} == {"DEC_LAYERS": 3}
    assert (d1.INPUT.MIN_SIZE_TEST, d3.INPUT.MIN_SIZE_TEST) == (576, 640)
    s, i = d1.SOLVER, d1.INPUT
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER, s.IMS_PER_BATCH, s.MAX_ITER) == (
        "ADAMW", 1e-4, 0.05, 0.1, 16, 368750)
    assert not s.CLIP_GRADIENTS.ENABLED and i.DATASET_MAPPER_NAME == "fastinst_instance"
    assert (tuple(i.MIN_SIZE_TRAIN), i.MAX_SIZE_TRAIN, tuple(i.CROP.SIZE), tuple(i.CROP.RESIZE.MIN_SIZE)) == (
        (416, 448, 480, 512, 544, 576, 608, 640), 853, (384, 600), (400, 500, 600))


def test_coco_d3_model_has_the_published_architecture(tmp_path):
    model = build_model(make_cfg(D3, tmp_path, "MODEL.DEVICE", "cpu"))
    dec, pix = model.transformer_decoder, model.pixel_decoder
    assert len(dec.layers) == 3 and len(dec.heads) == 4 and dec.meta_pos_embed.shape == (256, 10, 10)
    assert dec.aux_query_feat.weight.shape == (8, 256) and dec.heads[0].class_embed.layers[-1].out_features == 81
    assert pix.in_features == ["res5", "res4", "res3"] and len(pix.ppm.stages) == 4
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert 33 < params < 36, params  # published: 34M (D3 R50)


def test_fastinst_mapper_resizes_crops_flips_and_keeps_non_empty_masks(tmp_path):
    from detectron2.data import DatasetCatalog

    from maskfrozen.data.datasets import ensure_dataset_files
    from maskfrozen.data.mappers import build_mapper

    cfg = make_cfg(TINY, tmp_path, "INPUT.DATASET_MAPPER_NAME", "fastinst_instance", "INPUT.CROP.ENABLED", "True",
                   "INPUT.CROP.TYPE", "absolute_range", "INPUT.CROP.SIZE", "(40, 60)", "INPUT.CROP.RESIZE.ENABLED",
                   "True", "INPUT.CROP.RESIZE.MIN_SIZE", "(100,)", "INPUT.MIN_SIZE_TRAIN", "(96, 112)",
                   "INPUT.MAX_SIZE_TRAIN", "200")
    ensure_dataset_files("shapes_tiny_train")
    record = DatasetCatalog.get("shapes_tiny_train")[0]
    mapper = build_mapper(cfg, is_train=True)
    sizes = set()
    np.random.seed(0)
    for _ in range(12):
        out = mapper(record)
        inst = out["instances"]
        assert min(out["image"].shape[-2:]) in (96, 112) and inst.image_size == tuple(out["image"].shape[-2:])
        assert bool(inst.gt_masks.tensor.flatten(1).any(1).all())
        sizes.add(tuple(out["image"].shape[-2:]))
    assert any(h != w for h, w in sizes) or len(sizes) > 2  # crops of random aspect happened
    assert build_mapper(cfg, is_train=False).__class__.__name__ == "CheckedDatasetMapper"


def test_training_step_with_an_image_without_objects_and_two_image_sizes(tmp_path, one_thread):
    """A batch of a 128 x 128 image without GT and a 96 x 128 one with GT: finite losses and
    every parameter gets a gradient (nothing unused under DDP)."""
    torch.manual_seed(0)
    model = tiny_model(tmp_path).train()
    empty, full = synthetic_inputs(2)
    empty["instances"] = empty["instances"][[]]
    full = {**full, "image": full["image"][:, :96], "height": 96}
    full["instances"] = Instances((96, 128), gt_classes=full["instances"].gt_classes,
                                  gt_masks=BitMasks(full["instances"].gt_masks.tensor[:, :96]))
    losses = model([empty, full])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_configuration_errors_name_the_keys(tmp_path):
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.DEEP_SUPERVISION True"):
        tiny_model(tmp_path, "MODEL.MASK_FORMER.DEEP_SUPERVISION", "False")
    with pytest.raises(ValueError, match="PIXEL_DECODER_NAME gives none"):
        tiny_model(tmp_path, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoder",
                   "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NHEADS", "4")


def test_mapper_gives_empty_instances_for_an_image_with_only_crowd_annotations(tmp_path):
    from detectron2.data import DatasetCatalog

    from maskfrozen.data.datasets import ensure_dataset_files
    from maskfrozen.data.mappers import build_mapper

    cfg = make_cfg(TINY, tmp_path, "INPUT.DATASET_MAPPER_NAME", "fastinst_instance")
    ensure_dataset_files("shapes_tiny_train")
    record = dict(DatasetCatalog.get("shapes_tiny_train")[0])
    record["annotations"] = [{**a, "iscrowd": 1} for a in record["annotations"]]
    out = build_mapper(cfg, is_train=True)(record)
    inst = out["instances"]
    assert len(inst) == 0 and inst.gt_masks.tensor.shape == (0, *out["image"].shape[-2:])
