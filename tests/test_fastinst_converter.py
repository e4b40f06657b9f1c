"""The official FastInst checkpoint converter (junjiehe96/FastInst -> QuerySegmentor with
PyramidPoolingModuleFPN and FastInstDecoder): every official key of the D1 and D3 COCO models
lands at the right model key, shape mismatches are all named, and tools/convert_checkpoint.py
reads an official-style .pkl."""
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import maskfrozen  # noqa: F401  (registers the models)
from conftest import REPO, make_cfg
from maskfrozen.checkpoint.fastinst_converter import convert_fastinst_state_dict

COCO_D1 = os.path.join(REPO, "configs", "coco", "fastinst", "fastinst_R50_ppm-fpn_x1_576.yaml")
COCO_D3 = os.path.join(REPO, "configs", "coco", "fastinst", "fastinst_R50_ppm-fpn_x3_640.yaml")
TINY = os.path.join(REPO, "configs", "shapes", "fastinst", "fastinst_R18_tiny.yaml")

OFFICIAL_PD = "sem_seg_head.pixel_decoder."
OFFICIAL_PR = "sem_seg_head.predictor."
# our DualPathLayer part -> (official ModuleList, official attention attribute)
_OFFICIAL_LAYER_PARTS = {
    "query_cross_attention": ("transformer_query_cross_attention_layers", "multihead_attn"),
    "query_self_attention": ("transformer_query_self_attention_layers", "self_attn"),
    "query_ffn": ("transformer_query_ffn_layers", None),
    "pixel_cross_attention": ("transformer_mask_cross_attention_layers", "multihead_attn"),
    "pixel_ffn": ("transformer_mask_ffn_layers", None),
}
_OFFICIAL_HEAD_PARTS = {"norm": "decoder_query_norm_layers", "class_embed": "class_embed_layers",
                        "mask_embed": "mask_embed_layers", "pixel_proj": "mask_features_layers"}


def official_key(key: str) -> str:
    """The official FastInst name of one of our keys, written independently of the converter's
    table (from the official FastInstHead / PyramidPoolingModuleFPN / FastInstDecoder)."""
    parts = key.split(".")
    if parts[0] == "backbone":
        return key
    if parts[0] == "pixel_decoder":
        if parts[1] in ("lateral_convs", "output_convs"):  # ours coarsest first, official adapter_1 = res3
            name = "adapter" if parts[1] == "lateral_convs" else "layer"
            return f"{OFFICIAL_PD}{name}_{3 - int(parts[2])}." + ".".join(parts[3:])
        return OFFICIAL_PD + ".".join(parts[1:])  # ppm.*
    assert parts[0] == "transformer_decoder", key
    rest = parts[1:]
    if rest[0] in ("aux_query_feat", "aux_query_pos"):
        name = "empty_query_features" if rest[0] == "aux_query_feat" else "empty_query_pos_embed"
        return f"{OFFICIAL_PR}{name}.{rest[1]}"
    if rest[0] in ("meta_pos_embed", "query_proposal"):
        return OFFICIAL_PR + ".".join(rest)
    if rest[0] == "layers":
        group, attn = _OFFICIAL_LAYER_PARTS[rest[2]]
        tail = rest[3:]
        if tail[0] == "attn":
            tail = [attn, *tail[1:]]
        return f"{OFFICIAL_PR}{group}.{rest[1]}." + ".".join(tail)
    assert rest[0] == "heads", key
    return f"{OFFICIAL_PR}{_OFFICIAL_HEAD_PARTS[rest[2]]}.{rest[1]}." + ".".join(rest[3:])


def official_state_dict(model, cfg) -> dict:
    """Every key of an official FastInst checkpoint with its official shape, random values:
    our keys mapped back by :func:`official_key`, ``meta_pos_embed`` with its leading 1
    (``[1, C, s, s]``), and the criterion's ``empty_weight``, which the official model holds
    twice (its predictor registers the criterion as a submodule too)."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        shape = tuple(value.shape)
        if key == "transformer_decoder.meta_pos_embed":
            shape = (1, *shape)
        sd[official_key(key)] = shape
    k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1
    sd.update({"criterion.empty_weight": (k,), f"{OFFICIAL_PR}criterion.empty_weight": (k,)})
    g = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=g) for key, shape in sd.items()}


def _cfg_model(config, tmp_path, *opts):
    cfg = make_cfg(config, tmp_path, "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts)
    return cfg, build_model(cfg)


# official key counts, from the official modules: backbone (detectron2 R50, FrozenBN) 265;
# PPM-FPN 28 (3 adapters + 3 layers: conv weight + GN weight/bias; 4 PPM stages and the
# bottleneck: weight + bias); decoder 7 (meta_pos_embed, 2 empty-query embeddings, 4 proposal
# conv tensors) + 30 per layer (2 cross- and 1 self-attention: 4 + 2 norm; 2 FFNs: 4 + 2 norm)
# + 16 per head (L + 1 heads: norm 2, class MLP 6, mask MLP 6, mask_features 2); 2 empty_weight
@pytest.mark.parametrize("config,layers,num_keys,num_head_keys",
                         [(COCO_D1, 1, 364, 99), (COCO_D3, 3, 456, 191)], ids=["D1", "D3"])
def test_converter_round_trips_every_official_key(tmp_path, config, layers, num_keys, num_head_keys):
    cfg, model = _cfg_model(config, tmp_path)
    source = official_state_dict(model, cfg)
    assert len(source) == num_keys and sum(not k.startswith("backbone.") for k in source) == num_head_keys
    pd, pr, last = OFFICIAL_PD, OFFICIAL_PR, layers
    official_shapes = {  # from the official code and config (C = 256, 100 queries, 8 aux, FFN 1024)
        f"{pd}adapter_1.weight": (256, 512, 1, 1), f"{pd}adapter_3.weight": (256, 2048, 1, 1),
        f"{pd}layer_2.norm.bias": (256,), f"{pd}ppm.stages.3.1.weight": (64, 256, 1, 1),
        f"{pd}ppm.bottleneck.weight": (256, 512, 1, 1), f"{pr}meta_pos_embed": (1, 256, 10, 10),
        f"{pr}empty_query_features.weight": (8, 256), f"{pr}query_proposal.conv_proposal_cls_logits.2.weight":
        (81, 256, 1, 1), f"{pr}transformer_mask_ffn_layers.{last - 1}.linear1.weight": (1024, 256),
        f"{pr}transformer_query_self_attention_layers.{last - 1}.self_attn.in_proj_weight": (768, 256),
        f"{pr}class_embed_layers.{last}.layers.2.weight": (81, 256), f"{pr}mask_features_layers.{last}.weight":
        (256, 256), f"{pr}decoder_query_norm_layers.0.weight": (256,),
    }
    assert {k: tuple(source[k].shape) for k in official_shapes} == official_shapes

    target = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    converted, report = convert_fastinst_state_dict(source, target)
    assert report.unused_source_keys == [] and report.unmatched_target_keys == []
    assert sorted(report.dropped_aliases) == ["criterion.empty_weight", f"{pr}criterion.empty_weight"]
    assert len(converted) == len(target) == num_keys - 2 and report.num_target_keys == len(target)
    # the converter's table agrees with the independently written inverse, key by key
    assert report.renamed == {official_key(k): k for k in target}
    for src, dst in report.renamed.items():
        if dst != "transformer_decoder.meta_pos_embed":
            assert converted[dst] is source[src]
    model.load_state_dict(converted, strict=True)
    pix, dec = model.pixel_decoder, model.transformer_decoder
    checks = [
        (pix.lateral_convs[0].weight, f"{pd}adapter_3.weight"),  # res5, through the PPM
        (pix.lateral_convs[2].norm.bias, f"{pd}adapter_1.norm.bias"),  # res3
        (pix.output_convs[0].norm.weight, f"{pd}layer_3.norm.weight"),
        (pix.output_convs[1].weight, f"{pd}layer_2.weight"),
        (pix.ppm.stages[2][1].bias, f"{pd}ppm.stages.2.1.bias"),
        (dec.aux_query_pos.weight, f"{pr}empty_query_pos_embed.weight"),
        (dec.layers[last - 1].pixel_cross_attention.attn.in_proj_weight,
         f"{pr}transformer_mask_cross_attention_layers.{last - 1}.multihead_attn.in_proj_weight"),
        (dec.layers[0].query_cross_attention.attn.out_proj.weight,
         f"{pr}transformer_query_cross_attention_layers.0.multihead_attn.out_proj.weight"),
        (dec.layers[last - 1].query_ffn.linear2.bias, f"{pr}transformer_query_ffn_layers.{last - 1}.linear2.bias"),
        (dec.heads[last].pixel_proj.weight, f"{pr}mask_features_layers.{last}.weight"),
        (dec.heads[0].class_embed.layers[2].bias, f"{pr}class_embed_layers.0.layers.2.bias"),
    ]
    for param, key in checks:
        assert torch.equal(param, source[key]), key
    assert torch.equal(dec.meta_pos_embed, source[f"{pr}meta_pos_embed"][0])


def test_converter_names_every_shape_mismatch(tmp_path):
    """Three wrong shapes (a 80-class head for a 5-class model, adapters of res3 and res5
    swapped) are all listed; the meta_pos_embed of another query count is one too."""
    cfg, model = _cfg_model(TINY, tmp_path)
    source = official_state_dict(model, cfg)
    pr, pd = OFFICIAL_PR, OFFICIAL_PD
    source[f"{pr}class_embed_layers.1.layers.2.weight"] = torch.zeros(81, 32)
    source[f"{pd}adapter_1.weight"], source[f"{pd}adapter_3.weight"] = (source[f"{pd}adapter_3.weight"],
                                                                        source[f"{pd}adapter_1.weight"])
    source[f"{pr}meta_pos_embed"] = torch.zeros(1, 32, 10, 10)
    with pytest.raises(ValueError) as error:
        convert_fastinst_state_dict(source, model.state_dict())
    message = str(error.value)
    res3, res5 = (model.backbone.output_shape()[f].channels for f in ("res3", "res5"))
    expected = [
        r"class_embed_layers.1.layers.2.weight -> transformer_decoder.heads.1.class_embed.layers.2.weight: "
        r"checkpoint \(81, 32\) vs model \(6, 32\)",
        rf"adapter_1.weight -> pixel_decoder.lateral_convs.2.weight: checkpoint \(32, {res5}, 1, 1\) vs model "
        rf"\(32, {res3}, 1, 1\)",
        rf"adapter_3.weight -> pixel_decoder.lateral_convs.0.weight: checkpoint \(32, {res3}, 1, 1\)",
        r"meta_pos_embed -> transformer_decoder.meta_pos_embed: checkpoint \(32, 10, 10\) vs model \(32, 3, 3\)",
    ]
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert message.count(" -> ") == 4


def test_convert_checkpoint_tool_reads_an_official_pkl(tmp_path):
    """tools/convert_checkpoint.py --format fastinst: a detectron2-style .pkl (numpy arrays under
    "model") converts with --allow-pickle into a checkpoint the model loads strictly; without
    --allow-pickle it is refused and nothing is written."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    cfg, model = _cfg_model(TINY, tmp_path)
    source = {k: v.numpy() for k, v in official_state_dict(model, cfg).items()}
    pkl, out = tmp_path / "fastinst_test.pkl", tmp_path / "converted.pth"
    with open(pkl, "wb") as f:
        pickle.dump({"model": source, "__author__": "test"}, f)
    args = ["--format", "fastinst", "--config-file", TINY, str(pkl), str(out)]
    with pytest.raises(SystemExit, match="--allow-pickle"):
        convert_checkpoint.main(args)
    assert not out.exists()
    report = convert_checkpoint.main(["--allow-pickle", *args])
    assert report.unmatched_target_keys == [] and report.unused_source_keys == []
    assert len(report.dropped_aliases) == 2
    state = torch.load(out, weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    dec = model.transformer_decoder
    assert np.array_equal(dec.heads[2].mask_embed.layers[1].weight.detach().numpy(),
                          source["sem_seg_head.predictor.mask_embed_layers.2.layers.1.weight"])
    assert np.array_equal(dec.meta_pos_embed.detach().numpy(), source["sem_seg_head.predictor.meta_pos_embed"][0])
    assert np.array_equal(model.pixel_decoder.output_convs[2].weight.detach().numpy(),
                          source["sem_seg_head.pixel_decoder.layer_1.weight"])
