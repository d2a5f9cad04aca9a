"""TensorRT build and runner.

Three kinds of test, kept apart on purpose:
- plain Python (always run): the clear refusal without tensorrt or a suitable GPU, and the
  optimization-profile shapes derived from a graph;
- against a *fake* `tensorrt` (always run): checks which documented builder API calls our code
  makes and its bookkeeping (profiles, flags, timing cache). It proves nothing about TensorRT
  itself. The runner and the loop on TensorRT bundles are tested the same way in
  test_tensorrt_runtime.py;
- against the real tensorrt on a GPU: skipped, with the reason shown, where it is not installed
  (PyPI only has stubs; NVIDIA's index is unreachable from CI).
"""
from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_bundle import GAMMA, VOCAB, make_tiny_export

from dspark_export.build import pipeline, tensorrt_build
from dspark_export.build.profiles import TokenRange, load_profile
from dspark_export.build.tensorrt_build import (TensorRTBuildError, TensorRTUnavailable,
                                                build_engines, optimization_profiles,
                                                require_tensorrt)
from dspark_runtime.backends import tensorrt as trt_backend
from dspark_runtime.backends.tensorrt import TensorRTRunner

H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
NO_TRT = "tensorrt is not installed here (PyPI has stubs only; it comes from NVIDIA's index)"


# --- refusal before any work ---------------------------------------------------------------

def test_missing_tensorrt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable) as err:
        require_tensorrt(load_profile("h100"))
    assert "dspark-export[tensorrt]" in str(err.value)
    assert "https://pypi.nvidia.com" in str(err.value)


def test_tensorrt_build_without_tensorrt_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    def must_not_export(*args, **kwargs):
        raise AssertionError("the export ran before the TensorRT check")

    export_pkg = types.ModuleType("dspark_export.export")
    export_pkg.export_graphs = must_not_export
    monkeypatch.setitem(sys.modules, "dspark_export.export", export_pkg)
    for name in ("h100", "jetson-orin"):
        with pytest.raises(TensorRTUnavailable, match=r"dspark-export\[tensorrt\]"):
            pipeline.build_bundle(load_profile(name), None, None, tmp_path / "bundle",
                                  progress=False)
    assert list(tmp_path.iterdir()) == []


def test_no_gpu_or_wrong_gpu_is_refused(monkeypatch, fake_trt):
    monkeypatch.setattr(tensorrt_build, "gpu_info", lambda: None)
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU"):
        require_tensorrt(load_profile("h100"))
    monkeypatch.setattr(tensorrt_build, "gpu_info",
                        lambda: {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    with pytest.raises(TensorRTUnavailable, match="targets sm90.*A100.*8.0"):
        require_tensorrt(load_profile("h100"))
    assert require_tensorrt(load_profile("a100"))["compute_capability"] == "8.0"


# --- optimization profiles -----------------------------------------------------------------

def _graph(export: Path, name: str) -> onnx.ModelProto:
    return onnx.load(str(export / f"{name}.onnx"))


def test_target_gets_prefill_and_verify_profiles(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    profile = load_profile("h100")  # prefill 1/512/2048 x <=4 rows, verify opt 256 tokens
    (p_label, prefill), (v_label, verify) = optimization_profiles(
        _graph(export, "target"), "target", profile, GAMMA, VOCAB)
    assert (p_label, v_label) == ("prefill", "verify")
    assert prefill["input_ids"] == ((1, 1), (1, 512), (4, 2048))
    assert prefill["past_lengths"] == ((1,), (1,), (4,))
    assert prefill["past_key_0"] == ((1, 2, 0, 4), (1, 2, 8192, 4), (4, 2, 8192, 4))
    # verify: 1..64 rows of 1..gamma+1 tokens, tuned for 256 tokens = 64 rows of 4
    assert verify["input_ids"] == ((1, 1), (64, GAMMA + 1), (64, GAMMA + 1))
    assert verify["past_value_1"] == ((1, 2, 0, 4), (64, 2, 8192, 4), (64, 2, 8192, 4))


def test_batch_only_graphs_get_one_profile(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    profile = load_profile("jetson-orin")  # max_batch 4, verify opt 16 tokens
    [(label, verify)] = optimization_profiles(_graph(export, "verify"), "verify", profile,
                                              GAMMA, VOCAB)
    assert label == "verify"
    # A scheduler may verify 1..gamma drafts: the verify width is dynamic down to one draft.
    assert verify["target_logits"] == ((1, 2, VOCAB), (4, GAMMA + 1, VOCAB),
                                       (4, GAMMA + 1, VOCAB))
    assert verify["draft_ids"] == ((1, 1), (4, GAMMA), (4, GAMMA))
    [(label, _)] = optimization_profiles(_graph(export, "markov"), "markov", profile, GAMMA,
                                         VOCAB)
    draft = optimization_profiles(_graph(export, "draft"), "draft", profile, GAMMA, VOCAB)
    assert [label for label, _ in draft] == ["prefill", "verify"]
    assert draft[0][1]["context_features"] == ((1, 1, 8), (1, 128, 8), (1, 512, 8))


def test_unknown_dynamic_dimension_is_an_error(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    graph = _graph(export, "markov")
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "mystery"
    with pytest.raises(TensorRTBuildError, match="markov.onnx: input 'base_logits' axis 1 .*"
                                                 "'mystery'"):
        optimization_profiles(graph, "markov", load_profile("h100"), GAMMA, VOCAB)


# --- a fake tensorrt and cuda-python: our calls and bookkeeping, not TensorRT ----------------

class _Enum:
    def __init__(self, *names: str):
        for name in names:
            setattr(self, name, name)


class _FakeConfig:
    def __init__(self, log: dict):
        self.log, self.flags, self.profiles = log, [], []
        self.builder_optimization_level = 3
        self.hardware_compatibility_level = "NONE"

    def set_memory_pool_limit(self, pool, size):
        self.workspace = (pool, size)

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data):
        self.log["cache_loaded"] = data
        return types.SimpleNamespace(serialize=lambda: b"timing-cache")

    def set_timing_cache(self, cache, ignore_mismatch):
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)


def _fake_tensorrt(version: str, log: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.MemoryPoolType = _Enum("WORKSPACE")
    trt.BuilderFlag = _Enum("FP16", "BF16", "VERSION_COMPATIBLE")
    trt.HardwareCompatibilityLevel = _Enum("AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, data):
            self.network["model"] = onnx.load_from_string(data)
            return True

        def parse_from_file(self, path):
            self.network["model"] = onnx.load(path)
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return {"flags": flags}

        def create_builder_config(self):
            return _FakeConfig(log)

        def create_optimization_profile(self):
            profile = types.SimpleNamespace(shapes={})
            profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(
                name, (lo, opt, hi))
            return profile

        def build_serialized_network(self, network, config):
            name = network["model"].graph.name
            log.setdefault("built", {})[name] = (network["model"], config)
            return f"engine:{name}".encode()

    trt.OnnxParser, trt.Builder = Parser, Builder
    return trt


@pytest.fixture()
def fake_trt(monkeypatch, tmp_path):
    """tensorrt 11 (fake) on an H100 (fake); the SpecVerify plugin module replaced too."""
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.0.0.1", log))
    monkeypatch.setattr(tensorrt_build, "gpu_info", lambda: H100_GPU)
    plugin = types.ModuleType("dspark_plugins.spec_verify.tensorrt_plugin")
    plugin.register = lambda: log.__setitem__("registered", True)
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setattr(tensorrt_build, "TIMING_CACHE_DIR", tmp_path / "cache")
    return log


def test_build_engines_tensorrt11_fake(tmp_path, fake_trt):
    export = make_tiny_export(tmp_path / "export", precision="bf16")
    out = tmp_path / "out"
    out.mkdir()
    done = []
    info = build_engines(export, load_profile("h100"), out, on_graph=done.append)
    assert done == ["target", "draft", "markov", "verify"]
    assert sorted(p.name for p in out.iterdir()) == [
        "draft.engine", "markov.engine", "target.engine", "verify.engine"]
    assert (out / "target.engine").read_bytes() == b"engine:target"
    assert info["version"] == "11.0.0.1" and info["compute_capability"] == "9.0"
    assert info["strongly_typed"] is True and info["precision_flag"] is None
    assert info["plugins"][0]["op"] == "dspark::SpecVerify"
    assert [p["name"] for p in info["engines"]["target"]["optimization_profiles"]] == [
        "prefill", "verify"]
    target_model, target_config = fake_trt["built"]["target"]
    assert target_config.flags == []  # strongly typed: precision comes from the graph
    assert target_config.workspace == ("WORKSPACE", 16384 << 20)
    assert target_config.builder_optimization_level == 4
    assert len(target_config.profiles) == 2 and len(fake_trt["built"]["markov"][1].profiles) == 1
    verify_model = fake_trt["built"]["spec_verify"][0]
    assert fake_trt["registered"] and not verify_model.functions  # body stripped for the plugin
    assert [a.name for a in verify_model.graph.node[0].attribute] == ["plugin_namespace", "aot"]
    cache = tmp_path / "cache" / "trt-11.0.0.1-sm90.cache"
    assert cache.read_bytes() == b"timing-cache"


def test_build_engines_tensorrt10_uses_precision_flags_fake(tmp_path, fake_trt, monkeypatch):
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.0.35", log))
    export = make_tiny_export(tmp_path / "export", precision="fp16")
    out = tmp_path / "out"
    out.mkdir()
    h100 = load_profile("h100")
    profile = replace(h100, precision="fp16", tensorrt=replace(
        h100.tensorrt, version_compatible=True, hardware_compatibility="same_compute_capability",
        timing_cache=False))
    info = build_engines(export, profile, out)
    config = log["built"]["target"][1]
    assert config.flags == ["FP16", "VERSION_COMPATIBLE"]
    assert config.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY"
    assert info["strongly_typed"] is False and info["precision_flag"] == "FP16"
    assert "cache_loaded" not in log and not (tmp_path / "cache").exists()


# --- the real thing (skipped where tensorrt is absent) -------------------------------------

def test_real_tensorrt_build_and_run(tmp_path):
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    gpu = trt_backend.gpu_info()
    if gpu is None:
        pytest.skip("tensorrt is installed but no CUDA GPU is visible")
    major, minor = gpu["compute_capability"].split(".")
    h100 = load_profile("h100")
    profile = replace(h100, max_context=64, tensorrt=replace(
        h100.tensorrt, compute_capability=f"sm{major}{minor}",
        prefill_tokens=TokenRange(1, 8, 32), timing_cache=False))
    export = make_tiny_export(tmp_path / "export")
    out = tmp_path / "engines"
    out.mkdir()
    info = build_engines(export, profile, out)
    assert info["version"] == trt.__version__
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, (2, 3)),
             "position_ids": np.tile(np.arange(3), (2, 1)),
             "past_lengths": np.zeros(2, np.int64), "new_lengths": np.full(2, 3)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    expected = ort.InferenceSession(str(export / "target.onnx")).run(["logits"], feeds)[0]
    runner = TensorRTRunner(out / "target.engine")
    np.testing.assert_allclose(runner.infer(feeds)["logits"], expected, rtol=1e-3, atol=1e-3)
    runner.close()
