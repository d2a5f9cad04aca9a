"""Bundle format: writer, loader, integrity and compatibility checks, ORT build, SPS, pipeline.

The graphs here are tiny hand-made ONNX graphs that follow docs/graphs.md's names and dims, so
these tests stay fast; the real reference-pair build is covered end to end elsewhere.
"""
from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dspark_export.build import pipeline
from dspark_export.build.bundle_writer import BundleWriter, update_bundle
from dspark_export.build.onnxruntime_build import optimize_graphs
from dspark_runtime.backends.onnxruntime import session_options
from dspark_export.build.profiles import load_profile
from dspark_export.build.sps_profiling import default_token_counts, measure_sps
from dspark_runtime.backends.onnxruntime import OnnxRuntimeRunner
from dspark_runtime.bundle import (Bundle, BundleError, Platform, check_compatibility,
                                   read_manifest)
from dspark_runtime.sps import SPSTable
from dspark_plugins.spec_verify.onnx_function import make_verify_model

GAMMA, VOCAB, HIDDEN, KV_HEADS, HEAD_DIM, LAYERS = 3, 32, 8, 2, 4, 2


def _vi(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def tiny_target() -> onnx.ModelProto:
    """target.onnx's interface with an embedding, an lm_head and a read of every past buffer."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inputs = [_vi("input_ids", TensorProto.INT64, ["batch", "new_tokens"]),
              _vi("position_ids", TensorProto.INT64, ["batch", "new_tokens"]),
              _vi("past_lengths", TensorProto.INT64, ["batch"]),
              _vi("new_lengths", TensorProto.INT64, ["batch"])]
    outputs = [_vi("logits", f, ["batch", "new_tokens", VOCAB]),
               _vi("features", f, ["batch", "new_tokens", HIDDEN])]
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "kv_shape")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["features"]),
             helper.make_node("MatMul", ["features", "W"], ["raw_logits"]),
             helper.make_node("Reshape", ["features", "kv_shape"], ["heads"]),
             helper.make_node("Transpose", ["heads"], ["present"], perm=[0, 2, 1, 3])]
    past_sums = []
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(_vi(f"past_{kind}_{i}", f, ["batch", KV_HEADS, "past", HEAD_DIM]))
            outputs.append(_vi(f"present_{kind}_{i}", f, ["batch", KV_HEADS, "new_tokens",
                                                          HEAD_DIM]))
            nodes.append(helper.make_node("Identity", ["present"], [f"present_{kind}_{i}"]))
            nodes.append(helper.make_node("ReduceSum", [f"past_{kind}_{i}"], [f"sum_{kind}_{i}"],
                                          keepdims=0))
            past_sums.append(f"sum_{kind}_{i}")
    nodes.append(helper.make_node("Sum", past_sums, ["past_sum"]))
    nodes.append(helper.make_node("Add", ["raw_logits", "past_sum"], ["logits"]))
    graph = helper.make_graph(nodes, "target", inputs, outputs, inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])


def _tiny_graph(name: str, inputs: list[tuple[str, int, list]], output: tuple[str, int, list],
                op: str) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, [inputs[0][0]], [output[0]])], name,
                              [_vi(*i) for i in inputs], [_vi(*output)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])


def make_tiny_export(out: Path, precision: str = "fp32") -> Path:
    """An export folder as `export_graphs` writes it, with tiny graphs."""
    out.mkdir(parents=True)
    graphs = {
        "target": tiny_target(),
        "draft": _tiny_graph("draft", [("block_ids", TensorProto.INT64, ["batch", GAMMA]),
                                       ("context_features", TensorProto.FLOAT,
                                        ["batch", "context", HIDDEN])],
                             ("hidden_states", TensorProto.INT64, ["batch", GAMMA]), "Identity"),
        "markov": _tiny_graph("markov", [("base_logits", TensorProto.FLOAT,
                                          ["batch", GAMMA, VOCAB])],
                              ("draft_probs", TensorProto.FLOAT, ["batch", GAMMA, VOCAB]),
                              "Softmax"),
        "verify": make_verify_model(),
    }
    described = {}
    for name, model in graphs.items():
        onnx.checker.check_model(model)
        onnx.save_model(model, str(out / f"{name}.onnx"))
        described[name] = {"file": f"{name}.onnx",
                           "inputs": [{"name": v.name} for v in model.graph.input],
                           "outputs": [{"name": v.name} for v in model.graph.output]}
    tok = out / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    info = {"format_version": 1, "precision": precision, "gamma": GAMMA, "mask_token_id": 5,
            "target_layer_ids": [0, 1], "stop_token_ids": [2], "max_position_embeddings": 256,
            "target": {"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                       "hidden_size": HIDDEN, "vocab_size": VOCAB},
            "draft": {"num_layers": 1, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "hidden_size": HIDDEN, "feature_size": 2 * HIDDEN},
            "target_config": {"model_type": "llama", "eos_token_id": 2},
            "draft_config": {"block_size": GAMMA}, "graphs": described,
            "tokenizer": {"dir": "tokenizer", "files": ["tokenizer.json", "tokenizer_config.json"]}}
    (out / "export.json").write_text(json.dumps(info))
    return out


def _write_bundle(tmp_path: Path, name: str = "bundle") -> Path:
    """A complete ONNX Runtime bundle made with BundleWriter alone (no optimisation)."""
    export = make_tiny_export(Path(tempfile.mkdtemp(dir=tmp_path)) / "export")
    info = json.loads((export / "export.json").read_text())
    with BundleWriter(tmp_path / name) as writer:
        for graph in ("target", "draft", "markov", "verify"):
            writer.add_file(export / f"{graph}.onnx")
        writer.add_file(export / "tokenizer")
        writer.write_json("sps_table.json", {"version": 1, "device": "x", "backend": "onnxruntime",
                                             "points": [{"tokens": 1, "steps_per_s": 10.0,
                                                         "median_ms": 100.0}]})
        writer.write_manifest(profile=load_profile("cpu"), export_info=info,
                              graphs={g: f"{g}.onnx" for g in ("target", "draft", "markov",
                                                              "verify")},
                              session_options={"providers": ["CPUExecutionProvider"]})
    return tmp_path / name


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# --- writer and loader -------------------------------------------------------------------------

def test_round_trip(tmp_path):
    path = _write_bundle(tmp_path)
    bundle = Bundle.load(path)
    m = bundle.manifest
    assert m["format_version"] == "1" and m["backend"] == "onnxruntime"
    assert m["precision"] == "fp32" and m["profile_name"] == "cpu"
    assert m["profile"]["max_batch"] == load_profile("cpu").max_batch
    assert {"python", "onnx", "onnxruntime", "dspark_export"} <= set(m["tools"])
    assert m["shapes"]["gamma"] == GAMMA and m["shapes"]["vocab_size"] == VOCAB
    assert m["shapes"]["target"]["num_layers"] == LAYERS
    assert m["models"]["target"]["model_type"] == "llama"
    assert m["tokenizer"]["chat_template"] is True and m["tokenizer"]["eos_token_ids"] == [2]
    assert m["graphs"]["target"]["inputs"][0]["name"] == "input_ids"
    assert set(m["files"]) == {"target.onnx", "draft.onnx", "markov.onnx", "verify.onnx",
                               "sps_table.json", "tokenizer/tokenizer.json",
                               "tokenizer/tokenizer_config.json"}
    assert bundle.graphs["verify"] == path / "verify.onnx"
    assert bundle.tokenizer_dir == path / "tokenizer"
    assert bundle.sps_table_path == path / "sps_table.json"
    assert bundle.calibration_path is None
    assert _siblings(path) == []


def test_tampered_file_is_refused_by_name(tmp_path):
    path = _write_bundle(tmp_path)
    graph = path / "markov.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch for 'markov.onnx'"):
        Bundle.load(path)
    Bundle.load(path, verify=False)  # an explicit opt-out still loads


def test_missing_file_is_refused_by_name(tmp_path):
    path = _write_bundle(tmp_path)
    (path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing file 'tokenizer/tokenizer.json'"):
        Bundle.load(path)
    with pytest.raises(BundleError, match="missing file"):
        Bundle.load(path, verify=False)


def test_unknown_format_version_is_refused(tmp_path):
    path = _write_bundle(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = "2"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown format_version '2'"):
        Bundle.load(path)


def test_paths_outside_the_bundle_are_refused(tmp_path):
    path = _write_bundle(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../outside.onnx"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(path)


def test_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="missing manifest.json"):
        Bundle.load(tmp_path / "empty")


def test_export_folder_loads_as_onnxruntime_bundle(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    bundle = Bundle.load(export)
    assert bundle.backend == "onnxruntime" and bundle.precision == "fp32"
    assert bundle.shapes["gamma"] == GAMMA and bundle.shapes["max_context"] == 256
    assert bundle.graphs["target"] == export / "target.onnx"
    assert bundle.tokenizer_dir == export / "tokenizer" and bundle.sps_table_path is None
    (export / "draft.onnx").unlink()
    with pytest.raises(BundleError, match="missing file 'draft.onnx'"):
        Bundle.load(export)


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out) as writer:
            writer.write_json("sps_table.json", {"version": 1})
            raise RuntimeError("boom")
    assert not out.exists() and _siblings(out) == []


def test_writer_without_manifest_publishes_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="write_manifest"):
        with BundleWriter(out) as writer:
            writer.write_json("x.json", {})
    assert not out.exists() and _siblings(out) == []


def test_refuses_to_replace_a_non_bundle_directory(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        BundleWriter(out).__enter__()
    assert (out / "notes.txt").read_text() == "keep me" and _siblings(out) == []


def test_replaces_an_existing_bundle(tmp_path):
    path = _write_bundle(tmp_path)
    (path / "stale.txt").write_text("old")
    _write_bundle(tmp_path)  # same name again
    assert not (path / "stale.txt").exists()
    Bundle.load(path)
    assert _siblings(path) == []


def test_paths_stay_inside_the_bundle(tmp_path):
    with pytest.raises(ValueError, match="inside the bundle"):
        with BundleWriter(tmp_path / "b") as writer:
            writer.path("../escape.txt")


def test_update_bundle_records_new_file(tmp_path):
    path = _write_bundle(tmp_path)
    update_bundle(path, {"calibration.json": b'{"version": 1}'},
                  {"calibration": "calibration.json"})
    bundle = Bundle.load(path)
    assert bundle.calibration_path == path / "calibration.json"
    assert "calibration.json" in bundle.manifest["files"]


# --- compatibility -------------------------------------------------------------------------

def _trt_manifest(**overrides) -> dict:
    info = {"version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", "hardware_compatibility": "none",
            "version_compatible": False, **overrides}
    return {"backend": "tensorrt", "tensorrt": info}


H100 = Platform("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", None)


def test_tensorrt_manifest_for_this_gpu_is_compatible():
    assert check_compatibility(_trt_manifest(), H100) == []


def test_tensorrt_manifest_from_another_compute_capability_is_incompatible():
    a100 = Platform("10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0", None)
    problems = check_compatibility(_trt_manifest(), a100)
    assert len(problems) == 1 and "built for sm90 (Hopper: H100, H200)" in problems[0]
    assert "A100-SXM4-80GB) is sm80" in problems[0]
    # ampere_plus engines run on any sm80+ GPU, but not on Turing
    assert check_compatibility(_trt_manifest(hardware_compatibility="ampere_plus"), a100) == []
    turing = Platform("10.13.0.35", "Tesla T4", "7.5", None)
    assert check_compatibility(_trt_manifest(hardware_compatibility="ampere_plus"), turing)


def test_tensorrt_rtx_manifest_names_its_targets():
    manifest = {"backend": "tensorrt-rtx", "tensorrt": {
        "version": "1.7.1.116", "compute_capabilities": ["sm89", "sm120"]}}
    l4 = Platform("1.7.1.116", "NVIDIA L4", "8.9", None)
    assert check_compatibility(manifest, l4) == []
    problems = check_compatibility(manifest, Platform("1.7.1.116", "NVIDIA H100 80GB HBM3", "9.0", None))
    assert problems == ["the engines were built for sm89 (Ada: RTX 40xx, L4, L40S) or sm120 "
                        "(Blackwell: RTX 50xx, RTX PRO 6000); this GPU (NVIDIA H100 80GB HBM3) "
                        "is sm90"]
    nothing = check_compatibility(manifest, Platform(None, None, None, None))
    assert "dspark-export[tensorrt-rtx]" in nothing[0] and "no CUDA GPU" in nothing[1]


def test_tensorrt_version_rules():
    newer = Platform("10.14.1.48", H100.gpu_name, "9.0", None)
    assert "TensorRT 10.13.0.35" in check_compatibility(_trt_manifest(), newer)[0]
    assert check_compatibility(_trt_manifest(version_compatible=True), newer) == []
    older = Platform("10.12.0.36", H100.gpu_name, "9.0", None)
    assert check_compatibility(_trt_manifest(version_compatible=True), older)
    missing = Platform(None, None, None, None)
    assert len(check_compatibility(_trt_manifest(), missing)) == 2


def test_tensorrt_bundle_is_refused_on_load_here(tmp_path):
    path = _write_bundle(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(_trt_manifest())
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="cannot run here"):
        Bundle.load(path)
    assert read_manifest(path)["tensorrt"]["compute_capability"] == "9.0"  # inspect still reads


def test_onnxruntime_provider_check():
    manifest = {"backend": "onnxruntime",
                "session_options": {"providers": ["CUDAExecutionProvider"]}}
    cpu_only = Platform(None, None, None, ("CPUExecutionProvider",))
    assert "CUDAExecutionProvider" in check_compatibility(manifest, cpu_only)[0]
    manifest["session_options"]["providers"].append("CPUExecutionProvider")
    assert check_compatibility(manifest, cpu_only) == []


# --- ONNX Runtime build --------------------------------------------------------------------

def test_optimize_graphs_keeps_outputs_and_inlines_spec_verify(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    out = tmp_path / "opt"
    out.mkdir()
    options = optimize_graphs(export, load_profile("cpu"), out, ["target", "verify"])
    assert options["offline"]["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    verify = onnx.load(str(out / "verify.onnx"))
    assert not verify.functions and all(n.domain != "dspark" for n in verify.graph.node)
    rng = np.random.default_rng(1)
    feeds = {"target_logits": rng.standard_normal((2, GAMMA + 1, VOCAB)).astype(np.float32),
             "draft_ids": rng.integers(0, VOCAB, (2, GAMMA)),
             "draft_probs": rng.dirichlet(np.ones(VOCAB), (2, GAMMA)).astype(np.float32),
             "verify_lengths": np.array([GAMMA, 1]),
             "temperature": np.array([0.0, 1.0], np.float32),
             "uniforms": rng.random((2, GAMMA + 1)).astype(np.float32)}
    for name, graph_feeds in (("verify", feeds), ("target", _target_feeds(rng))):
        before = ort.InferenceSession(str(export / f"{name}.onnx")).run(None, graph_feeds)
        after = OnnxRuntimeRunner(out / f"{name}.onnx", providers=["CPUExecutionProvider"],
                                  session_options=session_options(options)).infer(graph_feeds)
        for expected, got in zip(before, after.values()):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _target_feeds(rng: np.random.Generator, rows: int = 2, tokens: int = 3, past: int = 5):
    feeds = {"input_ids": rng.integers(0, VOCAB, (rows, tokens)),
             "position_ids": np.tile(np.arange(tokens), (rows, 1)) + past,
             "past_lengths": np.full(rows, past), "new_lengths": np.full(rows, tokens)}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = rng.standard_normal(
                (rows, KV_HEADS, past, HEAD_DIM)).astype(np.float32)
    return feeds


# --- SPS -----------------------------------------------------------------------------------

def test_default_token_counts_are_geometric_and_cover_the_range():
    counts = default_token_counts(64)
    assert counts[0] == 1 and counts[-1] == 64 and counts == sorted(set(counts))
    assert 5 <= len(counts) <= 9
    assert default_token_counts(1) == [1]


def test_measure_sps_writes_a_table_the_runtime_reads(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    runner = OnnxRuntimeRunner(export / "target.onnx", providers=["CPUExecutionProvider"])
    seen = []
    original = runner.infer

    def spy(feeds):
        seen.append((feeds["input_ids"].shape, feeds["past_key_0"].shape,
                     int(feeds["new_lengths"].sum())))
        return original(feeds)

    runner.infer = spy
    shapes = {"gamma": GAMMA, "max_batch": 3, "max_context": 64,
              "target": {"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                         "vocab_size": VOCAB}}
    points = []
    table = measure_sps(runner, shapes, [1, 5, 12], repeats=2, device="cpu", backend="onnxruntime",
                        on_point=points.append)
    assert points == [1, 5, 12]
    assert table["past_length"] == 64 - (GAMMA + 1)
    # 5 tokens at gamma+1 = 4: two rows of width 4, the second padded to hold 1 valid token
    assert ((2, 4), (2, KV_HEADS, 60, HEAD_DIM), 5) in seen
    assert ((3, 4), (3, KV_HEADS, 60, HEAD_DIM), 12) in seen
    parsed = SPSTable.from_json(json.loads(json.dumps(table)))
    assert parsed.batch_tokens == [1, 5, 12] and all(s > 0 for s in parsed.steps_per_s)


def test_measure_sps_prefers_device_timing():
    class DeviceTimed:
        name, input_names, output_names = "target", [], []

        def infer(self, feeds):
            raise AssertionError("host round trips must not be timed when time_infer exists")

        def time_infer(self, feeds, repeats):
            return [0.004, 0.002, 0.003][:repeats]

    shapes = {"gamma": GAMMA, "max_batch": 1, "max_context": 64,
              "target": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2, "vocab_size": 4}}
    table = measure_sps(DeviceTimed(), shapes, [1, 4], repeats=3)
    assert [p["median_ms"] for p in table["points"]] == pytest.approx([3.0, 3.0])


# --- the build pipeline (ONNX Runtime, tiny graphs in place of the real export) --------------

@pytest.fixture()
def tiny_export_step(monkeypatch):
    """`dspark_export.export` replaced (no torch import): it writes the tiny export."""
    export_pkg = types.ModuleType("dspark_export.export")

    def fake_export(target_dir, draft_dir, out_dir, *, precision="fp32", opset=18,
                    on_step=lambda name: None, draft_vocab=0):
        for step in ("load", "target", "draft", "markov", "verify", "tokenizer"):
            on_step(step)
        return make_tiny_export(out_dir, precision)

    export_pkg.export_graphs = fake_export
    monkeypatch.setitem(sys.modules, "dspark_export.export", export_pkg)


def test_build_bundle_cpu(tmp_path, tiny_export_step):
    out = pipeline.build_bundle(load_profile("cpu"), None, None, tmp_path / "bundle",
                                progress=False)
    bundle = Bundle.load(out)
    assert bundle.backend == "onnxruntime"
    assert bundle.session_options["providers"] == ["CPUExecutionProvider"]
    table = SPSTable.load(bundle.sps_table_path)
    assert table.batch_tokens[0] == 1 and table.batch_tokens[-1] == 8 * (GAMMA + 1)
    files = set(bundle.manifest["files"])
    assert {"export.json", "tokenizer/tokenizer.json", "target.onnx"} <= files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_interrupted_build_leaves_no_bundle(tmp_path, tiny_export_step, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "measure_sps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_bundle(load_profile("cpu"), None, None, tmp_path / "bundle",
                              progress=False)
    assert list(tmp_path.iterdir()) == []
