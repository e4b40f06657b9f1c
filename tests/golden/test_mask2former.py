"""Mask2Former against its official implementation (facebookresearch/Mask2Former 9b0651c), on the
committed fixture ``fixtures/mask2former`` (tools/golden/official_mask2former.py): a narrow
ResNet-50, 1 encoder layer, 4 decoder layers, 16 queries, 7 classes, two images of different
sizes, output sizes different from the input sizes.

The official checkpoint is converted with tools/convert_checkpoint.py and loaded strictly into
the model of our COCO config with the same reductions; then backbone features, pixel-decoder
outputs, every layer's class and mask logits, the final ``Instances`` (COCOEvaluator's input),
and in training the matcher indices and all 15 loss terms, the point sampling replaying the
official run's uniform draws, are compared in float32.
"""
import pytest
import torch

from golden_compare import assert_trees_close, case
from query_seg_helpers import (RecordingMatcher, assert_instances_equal, converted_model, detectron2_inputs,
                               inference_stages)
from maskfrozen.checkpoint.formats import matching_formats
from maskfrozen.modeling.criterion.point_sampling import replay_points

ATOL = 1e-4


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    c = case("mask2former")
    model, report = converted_model(c, str(tmp_path_factory.mktemp("mask2former")), "mask2former")
    return model, report, c


@pytest.fixture(scope="module")
def ours(golden):
    torch.set_num_threads(1)
    model, _, c = golden
    return inference_stages(model, c["inputs"]["batch"])


def test_every_official_tensor_is_mapped_or_dropped_on_purpose(golden):
    """All tensors converted (the criterion's class weights dropped by a table row), and the
    key signatures tell the checkpoint from every other registered format."""
    _, report, c = golden
    checkpoint = torch.load(c["checkpoint"], weights_only=True)["model"]
    assert matching_formats(list(checkpoint)) == ["mask2former"]
    assert report.num_source_tensors == len(checkpoint)
    assert report.dropped_aliases == ["criterion.empty_weight"]
    assert len(report.renamed) == len(checkpoint) - 1
    assert not report.unused_source_keys and not report.unmatched_target_keys


def test_backbone_and_pixel_decoder_equal_the_official(ours, golden):
    official = golden[2]["outputs"]["inference"]
    assert_trees_close(ours["backbone"], official["backbone"], ATOL, "backbone features")
    assert_trees_close(ours["pixel_decoder"], official["pixel_decoder"], ATOL, "pixel decoder")


def test_every_decoder_layer_equals_the_official(ours, golden):
    official = golden[2]["outputs"]["inference"]["decoder"]
    assert sorted(ours["decoder"]) == sorted(official) == ["aux0", "aux1", "aux2", "aux3", "main"]
    assert_trees_close(ours["decoder"], official, ATOL, "decoder layers")


def test_instances_at_the_output_size_equal_the_official(ours, golden):
    """COCOEvaluator's input: top-k (query, class) pairs, score = p(class) x mean mask
    probability inside the mask, masks from the logits resized to the output size (one image
    smaller, one larger than its input)."""
    assert_instances_equal(ours["results"], golden[2]["outputs"]["inference"]["instances"], ATOL)


def _official_draw_order(points, num_layers):
    """Our criterion's order of uniform draws: per layer (main first, then aux0..), the
    matcher's shared points of each image, then the mask loss's candidates and fresh points;
    the official criterion draws in the same order."""
    order = []
    for layer in ["main"] + [f"aux{i}" for i in range(num_layers)]:
        order += points[f"{layer}.match"] + points[f"{layer}.loss"]
    return order


def test_training_matcher_indices_and_every_loss_equal_the_official(golden):
    torch.set_num_threads(1)
    model, _, c = golden
    official = c["outputs"]["training"]
    recorder = RecordingMatcher(model.criterion.matcher)
    model.criterion.matcher = recorder
    try:
        with replay_points(_official_draw_order(official["points"], 4)) as rest, torch.no_grad():
            losses = model.train()(detectron2_inputs(c["inputs"]["batch"], with_instances=True))
        assert next(rest, None) is None, "some official draws were not used"
    finally:
        model.criterion.matcher = recorder.inner
    names = ["main"] + [f"aux{i}" for i in range(4)]
    assert_trees_close(dict(zip(names, recorder.calls)), official["indices"], 0, "matcher indices")
    renamed = {}
    for key, value in losses.items():  # ours: loss_class[_aux{i}]; official: loss_ce[_{i}]
        key = key.replace("loss_class", "loss_ce").replace("_aux", "_")
        renamed[key] = value
    assert sorted(renamed) == sorted(official["losses"]) and len(renamed) == 15
    assert_trees_close(renamed, official["losses"], ATOL, "losses")
