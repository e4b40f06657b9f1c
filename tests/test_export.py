"""Export (issue 25): every model to ONNX / torch.export, run in ONNX Runtime, same predictions.

Per model (its tiny shapes config; Deformable-DETR and H-DETR: their shapes config at the tiny
DINO's sizes): one export (shared by the model's tests), then on two image sizes (and a batch of
both where the batch is dynamic) ONNX Runtime vs eager PyTorch: max abs difference <= 1e-4 on
class logits, boxes and mask logits; the same final Instances (same classes in the same ranking,
boxes within 0.5 px, mask IoU >= 0.99) through the exported model's own predictor path
(json + config + the model's post-processing). The deformable-attention op exports as standard
ONNX operators (no custom domain) by default, and as one custom-domain node on request.
"""
import os
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra (pip install .[export]) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra (pip install .[export]) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (pip install .[export]) is not installed")

from conftest import REPO, make_cfg  # noqa: E402

TINY_DETR = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "DATASETS.TRAIN", "('shapes_tiny_train',)",
             "DATASETS.TEST", "('shapes_tiny_val',)", "MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.NHEADS", "4",
             "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64",
             "MODEL.DETR.GN_GROUPS", "8", "MODEL.DETR.NUM_QUERIES", "20"]
MODELS = {
    "dino": ("configs/shapes/detr/dino_R18_tiny.yaml", []),
    "deformable_detr": ("configs/shapes/detr/deformable_detr_R18.yaml", TINY_DETR),
    "h_detr": ("configs/shapes/detr/h_detr_R18.yaml", TINY_DETR + ["MODEL.DETR.NUM_QUERIES_ONE2MANY", "20"]),
    "co_dino": ("configs/shapes/co_detr/co_dino_R18_tiny.yaml", []),
    "mask2former": ("configs/shapes/mask2former/maskformer2_R18_tiny.yaml", []),
    "fastinst": ("configs/shapes/fastinst/fastinst_R18_tiny.yaml", []),
    "sotr": ("configs/shapes/sotr/sotr_R18_tiny.yaml", []),
    "mask_frozen_detr": ("configs/shapes/mask_frozen_detr/dino_R18_tiny.yaml", []),
}
DEFORMABLE_ATTENTION = {"dino", "deformable_detr", "h_detr", "co_dino", "mask2former", "mask_frozen_detr"}
SIZES = [(137, 161), (192, 230)]  # (h, w): two sizes, neither a multiple of 32
ATOL = 1e-4
CLI_MODEL = "dino"  # exported through tools/export_model.py (ONNX, optimised as by default, and .pt2)
_EXPORTS: Dict[str, Dict] = {}


def _export(name: str, tmp_path_factory) -> Dict:
    """Build the model (fixed seed, random weights), export it once to ONNX, load it back."""
    if name in _EXPORTS:
        return _EXPORTS[name]
    from detectron2.modeling import build_model

    from maskfrozen.data.datasets import apply_dataset_config
    from maskfrozen.export import ExportedModel, export_model

    torch.manual_seed(0)
    config, opts = MODELS[name]
    out = tmp_path_factory.mktemp(f"export_{name}")
    cfg = apply_dataset_config(make_cfg(os.path.join(REPO, config), out, *opts))
    model = build_model(cfg).eval()
    if name == CLI_MODEL:  # through tools/export_model.py, both formats from one trace
        weights = str(out / "weights.pth")
        torch.save({"model": model.state_dict()}, weights)
        result = _tool("export_model").main([
            "--config-file", os.path.join(REPO, config), "--output", str(out), "--format", "onnx", "exported_program",
            "--verify", *opts, "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", weights])
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = weights
    else:
        result = export_model(cfg, str(out), "onnx", model=model, optimize=False)
    _EXPORTS[name] = {"name": name, "cfg": cfg, "model": model, "result": result,
                      "exported": ExportedModel(result.model_path)}
    return _EXPORTS[name]


@pytest.fixture(params=list(MODELS))
def exported(request, tmp_path_factory, one_thread):
    return _export(request.param, tmp_path_factory)


def _tool(name: str):
    """tools/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batched(sizes, seed: int = 1) -> List[Dict]:
    rng = np.random.default_rng(seed)
    return [{"image": torch.as_tensor(rng.integers(0, 256, (3, h, w)).astype("float32")), "height": h, "width": w}
            for h, w in sizes]


def test_onnx_matches_eager_on_two_sizes(exported):
    from maskfrozen.export import adapter_for
    from maskfrozen.export.verify import compare_instances, differences_by_kind, max_abs_differences

    adapter, exported_model = adapter_for(exported["model"]), exported["exported"]
    cases = [[size] for size in SIZES]
    if exported["result"].metadata["inputs"][0]["shape"][0] == "batch":
        cases.append(SIZES)  # a batch of both sizes: padding (and its masks) inside the graph
    for case in cases:
        batched = _batched(case)
        reference, images = adapter.run_eager(batched)
        outputs = exported_model.run(adapter.inputs_of(images))
        by_kind = differences_by_kind(max_abs_differences(reference, outputs), adapter.compared_outputs())
        for kind in ("logits", "boxes", "masks"):
            assert by_kind.get(kind, 0.0) <= ATOL, (case, by_kind)
        with torch.no_grad():  # the torch.export program the ONNX model was converted from
            program_outputs = adapter.outputs_of(exported["result"].program.module()(*adapter.inputs_of(images)))
        program_by_kind = differences_by_kind(max_abs_differences(reference, program_outputs),
                                              adapter.compared_outputs())
        assert max(program_by_kind.values()) <= ATOL, (case, program_by_kind)
        with torch.no_grad():
            eager = exported["model"](batched)
        for ours, theirs in zip(eager, exported_model(batched)):
            c = compare_instances(ours["instances"], theirs["instances"])
            print(f"[export] {exported['name']} {case}: onnx {by_kind} program {program_by_kind} {c}")  # pytest -s
            assert c["count"][0] == c["count"][1] > 0 and c["classes_equal"], (case, c)
            assert c["max_box_diff"] <= 0.5 and c["min_mask_iou"] >= 0.99 and c["max_score_diff"] <= 1e-4, (case, c)


def test_default_export_has_standard_operators_only(exported):
    graph = onnx.load(exported["result"].model_path)
    domains = {node.domain for node in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    if exported["name"] in DEFORMABLE_ATTENTION:
        assert any(node.op_type == "GridSample" for node in graph.graph.node)


# ----------------------------------------------------------------------------- the op alone
class _Attend(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        from maskfrozen.ops import ms_deform_attn

        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def _op_inputs(shapes, n: int, q: int, seed: int, heads: int = 2, dim: int = 4, points: int = 3):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial.prod(1)
    value = torch.randn(n, int(areas.sum()), heads, dim, generator=g)
    locations = torch.rand(n, q, heads, len(shapes), points, 2, generator=g) * 1.2 - 0.1  # some outside
    weights = torch.rand(n, q, heads, len(shapes), points, generator=g)
    return value, spatial, areas.cumsum(0) - areas, locations, weights


@pytest.fixture(scope="module")
def op_program():
    dims = {"n": torch.export.Dim("n"), "s": torch.export.Dim("s"), "q": torch.export.Dim("q")}
    spec = ({0: dims["n"], 1: dims["s"]}, None, None, {0: dims["n"], 1: dims["q"]}, {0: dims["n"], 1: dims["q"]})
    return torch.export.export(_Attend(), _op_inputs([[6, 5], [3, 3]], 2, 7, 0), dynamic_shapes=spec)


def test_op_exports_as_grid_sample_and_matches_the_kernel(op_program, tmp_path):
    """Standard operators only (one GridSample per level); ONNX Runtime equals the compiled
    kernel on other level sizes, batch and query counts than the traced ones."""
    from maskfrozen.ops import ms_deform_attn
    from maskfrozen.ops.onnx import onnx_translation_table

    path = str(tmp_path / "op.onnx")
    torch.onnx.export(op_program, dynamo=True, opset_version=18, custom_translation_table=onnx_translation_table(),
                      optimize=False).save(path)
    graph = onnx.load(path)
    assert {n.domain for n in graph.graph.node} == {""}
    assert [n.op_type for n in graph.graph.node].count("GridSample") == 2
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shapes, n, q in [([[6, 5], [3, 3]], 2, 7), ([[11, 4], [2, 9]], 3, 13)]:
        args = _op_inputs(shapes, n, q, seed=1)
        got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), args)})[0]
        assert np.abs(ms_deform_attn(*args, backend="cpu").numpy() - got).max() < 1e-5


def test_op_custom_domain_node_on_request(op_program, tmp_path):
    from maskfrozen.ops.onnx import CUSTOM_DOMAIN, CUSTOM_OP_NAME, onnx_translation_table

    path = str(tmp_path / "op_custom.onnx")
    torch.onnx.export(op_program, dynamo=True, opset_version=18,
                      custom_translation_table=onnx_translation_table(custom_domain=True), optimize=False).save(path)
    graph = onnx.load(path)
    assert [(n.domain, n.op_type, len(n.input)) for n in graph.graph.node] == [(CUSTOM_DOMAIN, CUSTOM_OP_NAME, 5)]
    assert (CUSTOM_DOMAIN, 1) in {(o.domain, o.version) for o in graph.opset_import}
    with pytest.raises(Exception, match=CUSTOM_OP_NAME):  # ONNX Runtime has no kernel for it
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- tool, predictors, errors
def test_export_tool_files_and_predictors(tmp_path_factory, one_thread):
    """tools/export_model.py writes model.onnx, model.pt2, model.json (names, preprocessing, class
    names) and model.yaml; ONNXPredictor on a BGR image (both formats) returns the Instances of
    maskfrozen.Predictor with the same weights."""
    import cv2

    from maskfrozen import Predictor
    from maskfrozen.export import ONNXPredictor
    from maskfrozen.export.verify import instances_match

    info = _export(CLI_MODEL, tmp_path_factory)
    result, cfg = info["result"], info["cfg"]
    assert set(result.model_paths) == {"onnx", "exported_program"}
    assert all(os.path.isfile(p) for p in [*result.model_paths.values(), result.metadata_path, result.config_path])
    meta = result.metadata
    assert [i["name"] for i in meta["inputs"]] == ["images", "image_sizes"]
    assert meta["outputs"] == ["pred_logits", "scores", "pred_boxes"]
    assert meta["preprocessing"]["pixel_mean"] == pytest.approx(list(cfg.MODEL.PIXEL_MEAN))
    assert meta["preprocessing"]["input_format"] == cfg.INPUT.FORMAT
    assert meta["class_names"] and len(meta["class_names"]) == cfg.MODEL.DETR.NUM_CLASSES
    image = cv2.cvtColor(np.random.default_rng(3).integers(0, 256, (150, 200, 3), dtype=np.uint8), cv2.COLOR_RGB2BGR)
    expected = Predictor(cfg)(image)["instances"]
    for path in result.model_paths.values():
        got = ONNXPredictor(path)(image)["instances"]
        assert got.image_size == expected.image_size == (150, 200)
        assert len(got) == len(expected) > 0 and instances_match(expected, got), path
    # tools/demo.py --onnx: overlays from the exported model, its config as the demo's config
    image_path = str(tmp_path_factory.mktemp("demo_in") / "image.png")
    cv2.imwrite(image_path, image)
    out = str(tmp_path_factory.mktemp("demo_out"))
    written = _tool("demo").main(["--config-file", result.config_path, "--onnx", result.model_paths["onnx"],
                                  "--input", image_path, "--output", out])
    assert [os.path.basename(p) for p in written] == ["image.png"] and os.path.getsize(written[0]) > 0


def test_unsupported_meta_architecture_is_named(tmp_path):
    from detectron2.modeling import build_model

    from maskfrozen.export import adapter_for

    model = build_model(make_cfg(os.path.join(REPO, "configs/shapes/mask_rcnn_R18_FPN_tiny.yaml"), tmp_path))
    with pytest.raises(NotImplementedError, match="GeneralizedRCNN.*DeformableDETRFamily"):
        adapter_for(model)


def test_missing_metadata_is_named(tmp_path):
    from maskfrozen.export import ExportedModel

    path = tmp_path / "model.onnx"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.json"):
        ExportedModel(str(path))


def test_op_exports_without_a_build(monkeypatch, tmp_path):
    """While exporting, the op is recorded as its custom-op node even without maskfrozen._C (no
    fallback to the reference's Python loop over levels), and its ONNX translation runs."""
    from maskfrozen.ops import dispatch, ms_deform_attn_reference
    from maskfrozen.ops.onnx import onnx_translation_table

    monkeypatch.setattr(dispatch, "_C", None)
    args = _op_inputs([[5, 4], [2, 3]], 1, 6, seed=2)
    program = torch.export.export(_Attend(), args)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.maskfrozen.ms_deform_attn.default) == 1
    assert torch.ops.aten.grid_sampler_2d.default not in targets
    path = str(tmp_path / "op.onnx")
    torch.onnx.export(program, dynamo=True, opset_version=18, custom_translation_table=onnx_translation_table(),
                      optimize=False).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), args)})[0]
    want = ms_deform_attn_reference(args[0], [[5, 4], [2, 3]], args[3], args[4])
    assert np.abs(want.numpy() - got).max() < 1e-5


def test_adaptive_avg_pool_stays_dynamic_in_onnx(tmp_path):
    """FastInst's pyramid pooling (adaptive average pooling to 1, 2, 3, 6): torch's default ONNX
    decomposition bakes the traced size's windows in; ours matches PyTorch at other sizes."""
    from maskfrozen.export.onnx_ops import translation_table

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, s).flatten(2) for s in (1, 2, 3, 6)], 2)

    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h", min=6), 3: torch.export.Dim("w", min=6)}
    program = torch.export.export(Pool(), (torch.randn(2, 3, 13, 17),), dynamic_shapes={"x": dims})
    path = str(tmp_path / "pool.onnx")
    torch.onnx.export(program, dynamo=True, opset_version=18, custom_translation_table=translation_table(),
                      optimize=False).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 8, 31), (3, 3, 24, 6), (1, 3, 7, 9)]:
        x = torch.randn(*shape)
        assert np.abs(Pool()(x).numpy() - session.run(None, {"x": x.numpy()})[0]).max() < 1e-6


def test_too_few_encoder_tokens_is_a_clear_error(tmp_path_factory):
    """The one limit of the exported DETR graphs (DINO, Co-DINO, H-DETR, two-stage
    Deformable-DETR, Mask Frozen-DETR): an image with fewer encoder tokens than queries (the
    PyTorch model pads its queries then) is refused by the exported model's predictor path with
    an error naming the sizes, instead of an ONNX Runtime broadcast failure."""
    from maskfrozen.export import adapter_for

    info = _export("dino", tmp_path_factory)
    queries = info["model"].transformer.num_queries
    exported_model, adapter = info["exported"], adapter_for(info["model"])
    batched = _batched([(65, 66)])  # 9x9 + 5x5 + 3x3 + 2x2 = 119 tokens >= 20 queries: runs
    assert len(exported_model(batched)[0]["instances"]) > 0
    adapter.model.transformer.num_queries = 200  # as a model with more queries than tokens
    try:
        with pytest.raises(ValueError, match=r"65x66 input gives 119 encoder tokens, fewer than .*NUM_QUERIES=200"):
            adapter.check_images(adapter.preprocess(batched))
    finally:
        adapter.model.transformer.num_queries = queries


def test_failed_graph_optimisation_keeps_the_unoptimised_graph(op_program, tmp_path, monkeypatch, caplog):
    """onnxscript's optimiser fails on some graphs (SOTR's split, onnxscript 0.7): the export then
    writes the unoptimised graph with a warning instead of failing."""
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram

    from maskfrozen.export.exporter import export_onnx

    def broken(self):
        self.model.graph.node(0).op_type = "Broken"  # what a half-finished pass could leave
        raise RuntimeError("Error during constant folding for node 'node_split_29' (::SplitToSequence)")

    monkeypatch.setattr(ONNXProgram, "optimize", broken)
    names = SimpleNamespace(input_names=("value", "spatial_shapes", "level_start_index", "locations", "weights"),
                            output_names=("out",))
    path = str(tmp_path / "op.onnx")
    with caplog.at_level("WARNING"):
        export_onnx(op_program, names, path, optimize=True)
    assert "graph optimisation failed (RuntimeError: Error during constant folding" in caplog.text
    graph = onnx.load(path)
    assert "Broken" not in {n.op_type for n in graph.graph.node}
    assert [i.name for i in graph.graph.input] == list(names.input_names)
