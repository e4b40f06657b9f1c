"""tools/benchmark_export.py: ONNX Runtime's per-node profile summed per op type, alternating
timing of the two sides, the table (the end-to-end run exports a model: see tests/test_export.py
for the export itself; the measured figures are in the README)."""
import os
import sys

import pytest

from conftest import REPO

onnx = pytest.importorskip("onnx", reason="the export extra (pip install .[export]) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (pip install .[export]) is not installed")

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark_export  # noqa: E402


def _add_mul_model(path: str) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    nodes = [helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["b"]),
             helper.make_node("MatMul", ["b", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)


def test_profile_is_summed_per_op_type(tmp_path):
    import numpy as np

    from maskfrozen.export import onnx_session

    path = str(tmp_path / "m.onnx")
    _add_mul_model(path)
    session = onnx_session(path, 1, profile_prefix=str(tmp_path / "prof"))
    for _ in range(3):
        session.run(None, {"x": np.ones((64, 64), np.float32)})
    totals = benchmark_export.profile_by_op_type(session.end_profiling())
    assert set(totals) == {"Add", "Mul", "MatMul"}
    assert all(v > 0 for v in totals.values())
    assert list(totals.values()) == sorted(totals.values(), reverse=True)


def test_alternating_timing_and_table():
    calls = []
    times = benchmark_export._alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b"] * 4 and set(times) == {"a", "b"}
    row = {"model": "M", "size": 800, "eager_image": 2.0, "onnx_image": 1.0, "speedup_image": 2.0,
           "eager_network": 1.5, "onnx_network": 0.5, "speedup_network": 3.0, "export_s": 60.0}
    table = benchmark_export.format_table([row])
    assert "2.00x" in table and "3.00x" in table and "ONNX Runtime / image (s)" in table
