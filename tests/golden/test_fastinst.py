"""FastInst against its official implementation (junjiehe96/FastInst 4996a61), on the committed
fixtures ``fixtures/fastinst_d1`` and ``fixtures/fastinst_d3`` (tools/golden/official_fastinst.py):
a narrow ResNet-50, 16 queries + 2 auxiliary ones, 7 classes, one and three decoder layers, two
images of different sizes, output sizes different from the input sizes.

The official checkpoint is converted with tools/convert_checkpoint.py and loaded strictly into
the model of our COCO D1 / D3 config with the same reductions. Inference: backbone features,
pixel-decoder levels, the query proposals (selected pixel indices exactly, their features and
positions), the last layer's class and mask logits, the final ``Instances`` (COCOEvaluator's
input). Training, the point sampling replaying the official run's uniform draws: the proposal
matcher's and every layer's Hungarian indices, the query locations, every layer's class and mask
logits (normal and GT-mask-guided), and all 3 x 2L + 4 loss terms, in float32.
"""
import os

import pytest
import torch

from golden_compare import REPO, assert_trees_close, case, convert_official
from query_seg_helpers import (RecordingMatcher, assert_instances_equal, converted_model, decoder_layers,
                               detectron2_inputs, inference_stages)
from maskfrozen.checkpoint.formats import matching_formats
from maskfrozen.modeling.criterion.point_sampling import replay_points

ATOL = 1e-4
CASES = ["fastinst_d1", "fastinst_d3"]


@pytest.fixture(scope="module", params=CASES)
def golden(request, tmp_path_factory):
    torch.set_num_threads(1)
    c = case(request.param)
    model, report = converted_model(c, str(tmp_path_factory.mktemp(request.param)), "fastinst")
    store = {}
    hook = model.transformer_decoder.query_proposal.register_forward_hook(
        lambda m, args, out: store.__setitem__("proposals", out))
    try:
        ours = inference_stages(model, c["inputs"]["batch"])
    finally:
        hook.remove()
    ours["proposals"] = store["proposals"]
    return model, report, c, ours


def _proposals(p, with_locations: bool):
    out = {"index": p.index, "features": p.features, "pos": p.pos, "logits": p.logits}
    if with_locations:
        out["locations"] = p.locations
    return out


def test_every_official_tensor_is_mapped_or_dropped_on_purpose(golden):
    """All tensors converted (the criterion's class weights, held twice, dropped by table rows),
    and the key signatures tell the checkpoint from every other registered format."""
    _, report, c, _ = golden
    checkpoint = torch.load(c["checkpoint"], weights_only=True)["model"]
    assert matching_formats(list(checkpoint)) == ["fastinst"]
    assert report.num_source_tensors == len(checkpoint)
    assert sorted(report.dropped_aliases) == ["criterion.empty_weight", "sem_seg_head.predictor.criterion.empty_weight"]
    assert len(report.renamed) == len(checkpoint) - 2
    assert not report.unused_source_keys and not report.unmatched_target_keys


def test_a_mask2former_checkpoint_given_as_fastinst_is_refused_naming_its_format(tmp_path):
    """The user's path: tools/convert_checkpoint.py --format fastinst on the official Mask2Former
    checkpoint exits naming mask2former, and writes nothing."""
    fastinst, mask2former = case("fastinst_d1"), case("mask2former")
    out = tmp_path / "out.pth"
    with pytest.raises(SystemExit, match="its keys are those of --format mask2former"):
        convert_official("fastinst", os.path.join(REPO, fastinst["meta"]["maskfrozen_config"]),
                         mask2former["checkpoint"], str(out), tuple(fastinst["meta"]["maskfrozen_overrides"]))
    assert not out.exists()


def test_inference_stages_equal_the_official(golden):
    _, _, c, ours = golden
    official = c["outputs"]["inference"]
    assert_trees_close(ours["backbone"], official["backbone"], ATOL, "backbone features")
    assert_trees_close(ours["pixel_decoder"]["multi_scale_features"], official["pixel_decoder"]["multi_scale_features"],
                       ATOL, "pixel decoder")
    assert_trees_close(_proposals(ours["proposals"], False), official["proposals"], ATOL, "query proposals")
    assert_trees_close(ours["decoder"]["main"], official["decoder"]["main"], ATOL, "last decoder layer")


def test_instances_at_the_output_size_equal_the_official(golden):
    """All top-k pairs kept (empty masks too), masks and scores from the logits resized to the
    output size."""
    _, _, c, ours = golden
    assert_instances_equal(ours["results"], c["outputs"]["inference"]["instances"], ATOL)


def _draw_order(points, num_layers):
    """Our order of the official run's uniform draws: the decoder's GT-guided matching, then the
    criterion's main set (main, aux0.. : matcher points per image, mask-loss candidates and fresh
    points), then the ``_gt`` set (its main = the last guided layer, then guided0..; fixed
    assignment: loss draws only). The official criterion supervises the guided layers first."""
    order = list(points["gt.match"])
    for layer in ["main"] + [f"aux{i}" for i in range(num_layers)]:
        order += points[f"{layer}.match"] + points[f"{layer}.loss"]
    for k in [num_layers - 1] + list(range(num_layers - 1)):
        order += points[f"guided{k}.loss"]
    return order


def _official_loss_name(key: str, num_layers: int) -> str:
    """Ours -> official: loss_class -> loss_ce; layer aux{k} -> _{L + k}; the ``_gt`` set's
    main -> _{L - 1}, its aux{k} -> _{k}."""
    term, _, rest = key.partition("_gt")
    term = term.replace("loss_class", "loss_ce")
    if key.startswith("loss_proposal"):
        return key
    if "_gt" in key:
        return f"{term}_{int(rest[4:]) if rest else num_layers - 1}"
    base, _, aux = key.partition("_aux")
    base = base.replace("loss_class", "loss_ce")
    return f"{base}_{num_layers + int(aux)}" if aux else base


def test_training_matching_layers_and_every_loss_equal_the_official(golden):
    model, _, c, _ = golden
    official = c["outputs"]["training"]
    num_layers = c["meta"]["dec_layers"]
    decoder = model.transformer_decoder
    matcher, proposal_matcher = RecordingMatcher(model.criterion.matcher), RecordingMatcher(decoder.proposal_matcher)
    model.criterion.matcher, decoder.proposal_matcher = matcher, proposal_matcher
    store = {}
    hooks = [decoder.register_forward_hook(lambda m, a, out: store.__setitem__("decoded", out)),
             decoder.query_proposal.register_forward_hook(lambda m, a, out: store.__setitem__("proposals", out))]
    try:
        with replay_points(_draw_order(official["points"], num_layers)) as rest, torch.no_grad():
            losses = model.train()(detectron2_inputs(c["inputs"]["batch"], with_instances=True))
        assert next(rest, None) is None, "some official draws were not used"
    finally:
        model.criterion.matcher, decoder.proposal_matcher = matcher.inner, proposal_matcher.inner
        for h in hooks:
            h.remove()
    names = ["gt", "main"] + [f"aux{i}" for i in range(num_layers)]
    assert_trees_close(dict(zip(names, matcher.calls)), official["indices"], 0, "matcher indices")
    assert_trees_close(proposal_matcher.calls[0], official["proposal_indices"], 0, "proposal matcher indices")
    assert_trees_close(_proposals(store["proposals"], True), official["proposals"], ATOL, "query proposals")
    decoded = store["decoded"]
    guided = decoder_layers(decoded.extra_query_sets[0].outputs)
    layers = {**decoder_layers(decoded.outputs), f"guided{num_layers - 1}": guided.pop("main"),
              **{f"guided{k}": layer for k, layer in ((int(n[3:]), v) for n, v in guided.items())}}
    assert_trees_close(layers, official["decoder"], ATOL, "decoder layers (normal and GT-guided)")
    renamed = {_official_loss_name(k, num_layers): v for k, v in losses.items()}
    assert sorted(renamed) == sorted(official["losses"]) and len(renamed) == 6 * num_layers + 4
    assert_trees_close(renamed, official["losses"], ATOL, "losses")
