"""Checkpoint converter: a synthetic detrex DINO state_dict (names and shapes written out
here, independently of the converter's table) converts, loads strictly and reproduces
its tensors; shape mismatches are refused; the official 91-row class heads stay whole, the
official DINO's shared decoder heads fill our shared head (per-layer heads are refused there),
its label book loses its never-used last row. The CLI refuses
a conversion that maps too little and files that are not checkpoints, naming the real cause,
and writes nothing then."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import maskfrozen
from maskfrozen.checkpoint import convert_detr_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "shapes", "detr", "dino_R18_tiny.yaml")



def _tiny_dino():
    cfg = get_cfg()
    maskfrozen.add_maskfrozen_config(cfg)
    cfg.merge_from_file(TINY)
    return cfg, build_model(cfg)


def detrex_dino_state_dict(cfg, backbone_and_neck):
    """detrex DINO parameter names (projects/dino) for the config's sizes."""
    d = cfg.MODEL.DETR
    c, ff, lv, h, pts = d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.NUM_FEATURE_LEVELS, d.NHEADS, d.ENC_N_POINTS
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {k: r(*v.shape) for k, v in backbone_and_neck.items()}
    sd["transformer.level_embeds"] = r(lv, c)
    sd["transformer.tgt_embed.weight"] = r(d.NUM_QUERIES, c)
    for name in ("enc_output", "enc_output_norm"):
        sd[f"transformer.{name}.weight"] = r(c, c) if name == "enc_output" else r(c)
        sd[f"transformer.{name}.bias"] = r(c)

    def msda(prefix):
        sd[prefix + "sampling_offsets.weight"], sd[prefix + "sampling_offsets.bias"] = r(h * lv * pts * 2, c), r(h * lv * pts * 2)
        sd[prefix + "attention_weights.weight"], sd[prefix + "attention_weights.bias"] = r(h * lv * pts, c), r(h * lv * pts)
        for p in ("value_proj", "output_proj"):
            sd[prefix + p + ".weight"], sd[prefix + p + ".bias"] = r(c, c), r(c)

    def ffn_and_norms(prefix, n_norms):
        sd[prefix + "ffns.0.layers.0.0.weight"], sd[prefix + "ffns.0.layers.0.0.bias"] = r(ff, c), r(ff)
        sd[prefix + "ffns.0.layers.1.weight"], sd[prefix + "ffns.0.layers.1.bias"] = r(c, ff), r(c)
        for i in range(n_norms):
            sd[prefix + f"norms.{i}.weight"], sd[prefix + f"norms.{i}.bias"] = r(c), r(c)

    for i in range(d.ENC_LAYERS):
        msda(f"transformer.encoder.layers.{i}.attentions.0.")
        ffn_and_norms(f"transformer.encoder.layers.{i}.", 2)
    for i in range(d.DEC_LAYERS):
        p = f"transformer.decoder.layers.{i}."
        sd[p + "attentions.0.attn.in_proj_weight"], sd[p + "attentions.0.attn.in_proj_bias"] = r(3 * c, c), r(3 * c)
        sd[p + "attentions.0.attn.out_proj.weight"], sd[p + "attentions.0.attn.out_proj.bias"] = r(c, c), r(c)
        msda(p + "attentions.1.")
        ffn_and_norms(p, 3)
    for j, (i, o) in enumerate([(2 * c, c), (c, c)]):
        sd[f"transformer.decoder.ref_point_head.layers.{j}.weight"] = r(o, i)
        sd[f"transformer.decoder.ref_point_head.layers.{j}.bias"] = r(o)
    sd["transformer.decoder.norm.weight"], sd["transformer.decoder.norm.bias"] = r(c), r(c)
    for k in range(d.DEC_LAYERS + 1):  # index DEC_LAYERS: encoder proposal head
        sd[f"class_embed.{k}.weight"], sd[f"class_embed.{k}.bias"] = r(d.NUM_CLASSES, c), r(d.NUM_CLASSES)
        for j, o in enumerate((c, c, 4)):
            sd[f"bbox_embed.{k}.layers.{j}.weight"], sd[f"bbox_embed.{k}.layers.{j}.bias"] = r(o, c), r(o)
    for k in list(sd):  # detrex aliases the heads under the decoder
        if k.startswith(("class_embed.", "bbox_embed.")):
            sd["transformer.decoder." + k] = sd[k]
    sd["label_enc.weight"] = r(d.NUM_CLASSES, c)
    return sd


def test_detrex_dino_round_trip():
    cfg, model = _tiny_dino()
    target = model.state_dict()
    shared = {k: v for k, v in target.items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    source = detrex_dino_state_dict(cfg, shared)
    converted, report = convert_detr_state_dict(source, "detrex", target)
    assert report.unused_source_keys == [] and report.unmatched_target_keys == []
    assert len(report.dropped_aliases) == 2 * (cfg.MODEL.DETR.DEC_LAYERS + 1) * 4  # class 2 + bbox 6 per head
    model.load_state_dict(converted, strict=False)
    missing = [k for k in target if k not in converted and "num_batches" not in k]
    assert missing == []
    checks = {
        "transformer.encoder.layers.0.ffns.0.layers.0.0.weight": "transformer.encoder.layers.0.ffn.linear1.weight",
        "transformer.decoder.layers.1.norms.0.weight": "transformer.decoder.layers.1.self_attn.norm.weight",
        "transformer.decoder.layers.1.attentions.0.attn.in_proj_weight": "transformer.decoder.layers.1.self_attn.attn.in_proj_weight",
        "transformer.decoder.layers.0.attentions.1.sampling_offsets.weight": "transformer.decoder.layers.0.cross_attn.attn.sampling_offsets.weight",
        "class_embed.2.bias": "transformer.class_embed.2.bias",
        "label_enc.weight": "denoising.label_enc.weight",
    }
    state = model.state_dict()
    for src, dst in checks.items():
        assert torch.equal(state[dst], source[src]), dst


def test_shape_mismatch_is_refused_with_all_keys_listed():
    cfg, model = _tiny_dino()
    target = model.state_dict()
    shared = {k: v for k, v in target.items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    source = detrex_dino_state_dict(cfg, shared)
    source["transformer.tgt_embed.weight"] = torch.zeros(900, cfg.MODEL.DETR.HIDDEN_DIM)
    source["class_embed.0.weight"] = torch.zeros(7, cfg.MODEL.DETR.HIDDEN_DIM)
    with pytest.raises(ValueError, match="shape mismatch") as err:
        convert_detr_state_dict(source, "detrex", target)
    assert "tgt_embed" in str(err.value) and "class_embed.0.weight" in str(err.value)


def test_original_repo_names_and_whole_91_row_heads():
    source = {
        "backbone.0.body.layer2.0.downsample.1.running_var": torch.ones(512),
        "backbone.0.body.layer1.1.bn2.weight": torch.ones(64),
        "input_proj.3.1.bias": torch.zeros(256),
        "transformer.decoder.layers.0.norm2.weight": torch.ones(256),
        "class_embed.0.bias": torch.arange(91.0),
        "some.unknown.key": torch.zeros(1),
    }
    converted, report = convert_detr_state_dict(source, "original")
    assert "backbone.res3.0.shortcut.norm.running_var" in converted
    assert "backbone.res2.1.conv2.norm.weight" in converted
    assert "neck.extra_convs.0.norm.bias" in converted
    assert "transformer.decoder.layers.0.self_attn.norm.weight" in converted  # self-attn norm
    # class heads whole: row r is COCO category id r (the official ranking and top-k use every row)
    assert torch.equal(converted["transformer.class_embed.0.bias"], torch.arange(91.0))
    assert report.unused_source_keys == ["some.unknown.key"]


def _head_target(heads: int, layers: int = 3, rows: int = 91, c: int = 8):
    """A stand-in target state dict: ``heads`` class / box heads and ``layers`` decoder layers."""
    target = {f"transformer.decoder.layers.{i}.ffn.linear1.weight": torch.zeros(16, c) for i in range(layers)}
    for k in range(heads):
        target[f"transformer.class_embed.{k}.weight"] = torch.zeros(rows, c)
        target[f"transformer.bbox_embed.{k}.layers.2.weight"] = torch.zeros(4, c)
    target["denoising.label_enc.weight"] = torch.zeros(rows, c)
    return target


def _official_dino_heads(shared: bool, rows: int = 91, c: int = 8):
    """Official DINO head keys of a 3-layer decoder: per-layer heads (one tensor when shared),
    the encoder heads, the label book of rows + 1 entries, the decoder aliases of the heads."""
    g = torch.Generator().manual_seed(0)
    head, box = torch.randn(rows, c, generator=g), torch.randn(4, c, generator=g)
    source = {f"transformer.decoder.layers.{i}.linear1.weight": torch.randn(16, c, generator=g) for i in range(3)}
    for i in range(3):
        source[f"class_embed.{i}.weight"] = head if shared else torch.randn(rows, c, generator=g)
        source[f"bbox_embed.{i}.layers.2.weight"] = box if shared else torch.randn(4, c, generator=g)
        source[f"transformer.decoder.class_embed.{i}.weight"] = source[f"class_embed.{i}.weight"]
        source[f"transformer.decoder.bbox_embed.{i}.layers.2.weight"] = source[f"bbox_embed.{i}.layers.2.weight"]
    source["transformer.enc_out_class_embed.weight"] = torch.randn(rows, c, generator=g)
    source["transformer.enc_out_bbox_embed.layers.2.weight"] = torch.randn(4, c, generator=g)
    source["label_enc.weight"] = torch.arange(float(rows + 1))[:, None].repeat(1, c)
    return source


def test_official_dino_shared_heads_encoder_head_and_label_book():
    """The official DINO shares its decoder heads: index 0 fills our shared head 0, indices 1-2
    are dropped as aliases, the encoder heads become our last head (index 1 with sharing, 3
    without); the label book loses its never-drawn last row; every tensor is accounted for."""
    source = _official_dino_heads(shared=True)
    converted, report = convert_detr_state_dict(source, "original_dino", _head_target(heads=2))
    assert torch.equal(converted["transformer.class_embed.0.weight"], source["class_embed.0.weight"])
    assert torch.equal(converted["transformer.class_embed.1.weight"], source["transformer.enc_out_class_embed.weight"])
    assert torch.equal(converted["transformer.bbox_embed.1.layers.2.weight"],
                       source["transformer.enc_out_bbox_embed.layers.2.weight"])
    assert converted["denoising.label_enc.weight"][:, 0].tolist() == [float(i) for i in range(91)]
    assert report.sliced_rows == ["denoising.label_enc.weight"]
    assert "class_embed.2.weight" in report.dropped_aliases and report.unused_source_keys == []
    assert report.unmatched_target_keys == []
    assert len(report.renamed) + len(report.dropped_aliases) == report.num_source_tensors
    # the same checkpoint into per-layer heads: copies of the shared tensor, encoder head last
    converted, report = convert_detr_state_dict(source, "original_dino", _head_target(heads=4))
    assert torch.equal(converted["transformer.class_embed.2.weight"], source["class_embed.0.weight"])
    assert torch.equal(converted["transformer.class_embed.3.weight"], source["transformer.enc_out_class_embed.weight"])
    assert report.unmatched_target_keys == []


def test_distinct_per_layer_heads_into_a_shared_head_are_refused():
    with pytest.raises(ValueError, match="SHARE_DECODER_HEADS False") as err:
        convert_detr_state_dict(_official_dino_heads(shared=False), "original_dino", _head_target(heads=2))
    assert "class_embed.1.weight" in str(err.value)


def test_91_row_heads_into_80_rows_are_a_shape_error_naming_num_classes():
    with pytest.raises(ValueError, match="shape mismatch") as err:
        convert_detr_state_dict(_official_dino_heads(shared=True), "original_dino", _head_target(heads=2, rows=80))
    assert "(91, 8) vs model (80, 8)" in str(err.value) and "NUM_CLASSES (91 for the official checkpoints)" in str(err.value)


def test_cli_writes_loadable_checkpoint(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    cfg, model = _tiny_dino()
    target = model.state_dict()
    shared = {k: v for k, v in target.items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    src = tmp_path / "detrex.pth"
    torch.save({"model": detrex_dino_state_dict(cfg, shared)}, src)
    out = tmp_path / "out.pth"
    report = convert_checkpoint.main(["--format", "detrex", "--config-file", TINY, str(src), str(out)])
    assert report.unmatched_target_keys == []
    loaded = torch.load(out, weights_only=True)["model"]
    model.load_state_dict(loaded, strict=False)


# ---- errors of the CLI: nothing written, the real cause named ------------------------------

def _converter():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    return convert_checkpoint


def _cli_error(tmp_path, src, *extra):
    """main()'s SystemExit message for ``src``; asserts that nothing was written."""
    out = tmp_path / "out" / "converted.pth"
    with pytest.raises(SystemExit) as info:
        _converter().main(["--format", "detrex", "--config-file", TINY, *extra, str(src), str(out)])
    message = str(info.value.code)
    assert message.startswith("convert_checkpoint.py: error: ") and f"nothing written to {str(out)!r}" in message
    assert not out.parent.exists() or os.listdir(out.parent) == []
    return message


def test_cli_wrong_format_is_an_error_naming_the_format_that_fits(tmp_path):
    cfg, model = _tiny_dino()
    target = model.state_dict()
    shared = {k: v for k, v in target.items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    source = detrex_dino_state_dict(cfg, shared)
    src = tmp_path / "detrex.pth"
    torch.save({"model": source}, src)
    out = tmp_path / "out.pth"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "--format", "original",
                          "--config-file", TINY, str(src), str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert "is not a 'original' checkpoint: its keys are those of --format detrex" in run.stderr
    assert "detrex.pth" in run.stderr and "--allow-partial" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_zero_tensors_mapped_is_an_error_even_with_allow_partial(tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"model": {"some.other.model.weight": torch.zeros(3)}}, src)
    message = _cli_error(tmp_path, src)
    assert "its keys fit none of the known formats" in message and "some.other.model.weight" in message
    message = _cli_error(tmp_path, src, "--allow-partial")
    assert "only 0 of the model's" in message and "0 of the checkpoint's 1 tensors mapped" in message


def test_cli_incomplete_conversion_is_an_error_unless_allow_partial(tmp_path):
    cfg, model = _tiny_dino()
    shared = {k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    source = detrex_dino_state_dict(cfg, shared)
    source.pop(next(k for k in source if k.startswith("transformer.encoder.layers.0.attentions.0.value_proj")))
    source["some.extra.tensor"] = torch.zeros(2)
    src = tmp_path / "detrex_incomplete.pth"
    torch.save({"model": source}, src)
    message = _cli_error(tmp_path, src)
    assert "1 model keys got no value (e.g. transformer.encoder.layers.0.self_attn.attn.value_proj" in message
    assert "1 checkpoint tensors map to nothing (e.g. some.extra.tensor)" in message
    out = tmp_path / "partial.pth"
    report = _converter().main(["--format", "detrex", "--config-file", TINY, "--allow-partial", str(src), str(out)])
    assert len(report.unmatched_target_keys) == 1 and out.is_file()


@pytest.mark.parametrize("content, allow_pickle, cause", [
    (b"", False, "is empty (0 bytes)"),
    (b"not a checkpoint at all\n" * 4, True, "is not a torch checkpoint: it starts with b'not a ch'"),
    (b"not a checkpoint at all\n" * 4, False, "is not a torch checkpoint"),
    (b"\x80\x02garbage", True, "cannot load"),
])
def test_cli_non_checkpoint_names_the_real_cause(tmp_path, content, allow_pickle, cause):
    src = tmp_path / "file.bin"
    src.write_bytes(content)
    message = _cli_error(tmp_path, src, *(["--allow-pickle"] if allow_pickle else []))
    assert cause in message and "file.bin" in message
    assert "--allow-pickle" not in message


def test_cli_pickled_objects_suggest_allow_pickle_only_without_it(tmp_path):
    import argparse
    import zipfile

    src = tmp_path / "original.pth"
    torch.save({"args": argparse.Namespace(lr=1), "model": {"w": torch.zeros(1)}}, src)
    message = _cli_error(tmp_path, src)
    assert "pass --allow-pickle" in message and "argparse.Namespace" in message
    # with --allow-pickle it loads: the remaining error is the real one (nothing maps)
    assert "fit none of the known formats" in _cli_error(tmp_path, src, "--allow-pickle")
    archive = tmp_path / "not_torch.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    message = _cli_error(tmp_path, archive, "--allow-pickle")
    assert "cannot load" in message and "--allow-pickle" not in message
    torch.save([torch.zeros(1)], src)
    assert "holds a list, not a dict of model tensors" in _cli_error(tmp_path, src)


def test_cli_output_is_world_readable_and_not_the_input(tmp_path):
    cfg, model = _tiny_dino()
    shared = {k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "neck.")) and "num_batches" not in k}
    src = tmp_path / "detrex.pth"
    torch.save({"model": detrex_dino_state_dict(cfg, shared)}, src)
    old = os.umask(0o022)
    try:
        _converter().main(["--format", "detrex", "--config-file", TINY, str(src), str(tmp_path / "out.pth")])
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.pth").st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["detrex.pth", "out.pth"]
    before = src.read_bytes()
    with pytest.raises(SystemExit, match="is the input checkpoint"):
        _converter().main(["--format", "detrex", "--config-file", TINY, str(src), str(src)])
    assert src.read_bytes() == before


def test_official_checkpoints_fit_exactly_their_format():
    """The golden fixtures' official checkpoints (Deformable-DETR, H-DETR, DINO): each fits its
    own registered format and no other (so --format auto-detection names the right one)."""
    from maskfrozen.checkpoint.formats import matching_formats

    fixtures = os.path.join(REPO, "tests", "golden", "fixtures")
    expected = {"deformable_detr": ["original"], "h_detr": ["original"], "dino": ["original_dino"]}
    for case, formats in expected.items():
        keys = torch.load(os.path.join(fixtures, case, "checkpoint.pth"), weights_only=True)["model"]
        assert matching_formats(list(keys)) == formats, case
