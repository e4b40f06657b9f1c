"""The DETR family's official checkpoints hold a torchvision ResNet-50 (``backbone.0.body.*``,
frozen batch norm), which the golden tests replace by fixed features: here its conversion is
tested on its own. A torchvision ``resnet50`` with random weights and batch-norm statistics,
converted by the "original" key table, gives in our detectron2 backbone (the COCO configs'
R50: stride in the 3x3 conv, FrozenBN) the same res2..res5 features as torchvision's
layer1..layer4. And a whole official checkpoint (the golden case's transformer, input
projections at the R50 widths, the ResNet-50) converts 100% under the registered format:
its key signature fits, every tensor is mapped or dropped by a table row, every model key filled."""
import os
import sys

import pytest
import torch
import torchvision
from detectron2.modeling import build_backbone, build_model
from torchvision.ops.misc import FrozenBatchNorm2d

from maskfrozen.checkpoint import FORMATS, convert_detr_state_dict
from maskfrozen.checkpoint.formats import check_format_fits, matching_formats
from maskfrozen.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")
CONFIG = os.path.join(REPO, "configs", "coco", "deformable_detr", "deformable_detr_R50_two_stage_50ep.yaml")


@pytest.fixture(scope="module")
def torchvision_resnet50():
    """The official backbone body: torchvision's resnet50 with frozen batch norm, random weights
    and statistics (float64), as ``{name: tensor}`` under the official prefix and as a model."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).double().eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    state = {f"backbone.0.body.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    return net, state


def test_resnet50_features_equal_torchvision_after_conversion(torchvision_resnet50):
    net, official = torchvision_resnet50
    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"])
    ours = build_backbone(cfg).double().eval()
    target = {f"backbone.{k}": v for k, v in ours.state_dict().items()}
    converted, report = convert_detr_state_dict(official, "original", target)
    assert report.unused_source_keys == [] and report.unmatched_target_keys == []
    assert len(converted) == len(official) == 265  # conv + 4 frozen-BN tensors per layer, fc left out
    ours.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=True)
    image = torch.randn(1, 3, 45, 61, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = ours(image)
        x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
        for k in range(1, 5):
            x = getattr(net, f"layer{k}")(x)
            assert features[f"res{k + 1}"].shape == x.shape
            assert torch.allclose(features[f"res{k + 1}"], x, atol=1e-10, rtol=0), f"res{k + 1}"


@pytest.mark.parametrize("case", ["deformable_detr", "h_detr", "dino"])
def test_a_whole_official_checkpoint_converts_completely(case, torchvision_resnet50):
    """The golden case's checkpoint with its input projections widened to the ResNet-50's
    512 / 1024 / 2048 channels and the ResNet-50 added: the registered format's key signature
    fits, every tensor maps (or is dropped by a table row: the decoder's head aliases, DINO's
    shared copies) and every key of the shipped COCO config's model (same reductions) is
    filled, as tools/convert_checkpoint.py requires."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    sys.path.append(GOLDEN)  # last: tests/conftest.py stays `conftest` for spawned DDP workers
    from convert_checkpoint import check_complete
    from golden_compare import case as golden_case

    c = golden_case(case)
    official = {k: v.float() for k, v in torchvision_resnet50[1].items()}
    official.update(torch.load(c["checkpoint"], weights_only=True)["model"])
    g = torch.Generator().manual_seed(0)
    for level, channels in enumerate((512, 1024, 2048, 2048)):
        weight = official[f"input_proj.{level}.0.weight"]
        official[f"input_proj.{level}.0.weight"] = torch.randn(weight.shape[0], channels, *weight.shape[2:], generator=g)
    fmt = "original_dino" if case == "dino" else "original"
    check_format_fits(fmt, list(official))
    assert matching_formats(list(official)) == [fmt]  # and no other registered format
    cfg = load_config(os.path.join(REPO, c["meta"]["maskfrozen_config"]), c["meta"]["maskfrozen_opts"] + ["MODEL.DEVICE", "cpu"])
    target = build_model(cfg).state_dict()
    converted, report = FORMATS[fmt].convert(official, target, cfg)
    check_complete(report)
    assert len(report.renamed) + len(report.dropped_aliases) == report.num_source_tensors == len(official)
    assert report.num_target_keys == len(converted) == len(report.renamed) > 265
    assert all(k.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.", "class_embed.",
                             "bbox_embed.")) for k in report.dropped_aliases)
