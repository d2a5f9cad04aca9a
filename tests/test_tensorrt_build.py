"""TensorRT build, both flavours, and TensorRT bundles on a machine that cannot run them.

Kept apart on purpose:
- plain Python (always run): refusals before any work, optimization-profile shapes;
- the REAL TensorRT-RTX builder (the tensorrt-rtx extra; skipped with the reason where it is
  absent): the tiny exported pair built into four engines whose I/O, read from the parsed
  networks, is checked against docs/graphs.md; inspect and run on this GPU-less machine; parse
  failures; an interrupted build. Every builder call full TensorRT shares with TensorRT-RTX is
  exercised here against the real library;
- the calls only full TensorRT makes (precision flags on TensorRT 10, hardware and version
  compatibility, the timing cache) against a FAKE builder config: they check which documented
  calls our code makes, nothing about TensorRT;
- full TensorRT for real: skipped with the reason where it is absent (not on PyPI).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import export_tiny_pair
from test_bundle import GAMMA, VOCAB, make_tiny_export

from dspark_export.build import pipeline, tensorrt_build
from dspark_export.build.profiles import TokenRange, load_profile
from dspark_export.build.tensorrt_build import (TensorRTBuildError, TimingCache, build_engines,
                                                optimization_profiles, require_builder)
from dspark_runtime.backends import BackendUnavailable
from dspark_runtime.backends.tensorrt import FULL, RTX, TensorRTRunner
from dspark_runtime.draft_gate import pending_context_width

H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100_GPU = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
NO_TRT = "full TensorRT is not installed here (not on PyPI: it comes from NVIDIA's index)"
NO_RTX = "TensorRT-RTX is not installed (pip install 'dspark-export[tensorrt-rtx]')"
DOCS = Path(__file__).resolve().parents[1] / "docs"
SPEC = Path(__file__).resolve().parents[1] / "plugins" / "spec_verify" / "spec.md"


# --- refusal before any work -----------------------------------------------------------------

@pytest.mark.parametrize("profile, module, extra", [("h100", "tensorrt", "dspark-export[tensorrt]"),
                                                    ("rtx4090", "tensorrt_rtx_bindings",
                                                     "dspark-export[tensorrt-rtx]")])
def test_missing_builder_names_the_extra_and_writes_nothing(tmp_path, monkeypatch, profile,
                                                            module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError

    def must_not_export(*args, **kwargs):
        raise AssertionError("the export ran before the builder check")

    export_pkg = types.ModuleType("dspark_export.export")
    export_pkg.export_graphs = must_not_export
    monkeypatch.setitem(sys.modules, "dspark_export.export", export_pkg)
    with pytest.raises(BackendUnavailable, match=re.escape(extra)):
        pipeline.build_bundle(load_profile(profile), None, None, tmp_path / "bundle",
                              progress=False)
    assert list(tmp_path.iterdir()) == []


def test_full_tensorrt_needs_the_profiles_gpu(monkeypatch, fake_gpu):
    fake = types.ModuleType("tensorrt")  # FAKE: only its presence and version are read here
    fake.__version__ = "10.13.0.35"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    fake_gpu(None)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU of compute capability sm90"):
        require_builder(load_profile("h100"))
    fake_gpu(A100_GPU)
    with pytest.raises(BackendUnavailable, match="targets sm90.*A100.*8.0"):
        require_builder(load_profile("h100"))
    fake_gpu(H100_GPU)
    assert require_builder(load_profile("h100"))["compute_capabilities"] == ["sm90"]


# --- optimization profiles -------------------------------------------------------------------

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
    # decode: one round's accepted tokens, or more after rounds that skipped drafting
    assert draft[1][1]["context_features"] == ((1, 1, 8), (4, GAMMA + 1, 8),
                                               (4, pending_context_width(GAMMA), 8))
    assert draft[1][1]["block_ids"] == ((1, GAMMA), (4, GAMMA), (4, GAMMA))


def test_unknown_dynamic_dimension_is_an_error(tmp_path):
    export = make_tiny_export(tmp_path / "export")
    graph = _graph(export, "markov")
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "mystery"
    with pytest.raises(TensorRTBuildError, match="markov.onnx: input 'base_logits' axis 1 .*"
                                                 "'mystery'"):
        optimization_profiles(graph, "markov", load_profile("h100"), GAMMA, VOCAB)


# --- full TensorRT only: a FAKE builder config records the calls -------------------------------

class _Enum:
    def __init__(self, *names: str):
        for name in names:
            setattr(self, name, name)


def _fake_full_tensorrt(version: str) -> types.SimpleNamespace:
    """The enums `_configure` reads, as TensorRT 10/11 name them (FAKE)."""
    return types.SimpleNamespace(
        __version__=version, MemoryPoolType=_Enum("WORKSPACE"),
        BuilderFlag=_Enum("FP16", "BF16", "VERSION_COMPATIBLE"),
        ProfilingVerbosity=_Enum("DETAILED"),
        HardwareCompatibilityLevel=_Enum("AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"))


class _FakeConfig:
    def __init__(self):
        self.flags: list[str] = []
        self.hardware_compatibility_level = "NONE"
        self.cache_data: list[bytes] = []

    def set_memory_pool_limit(self, pool, size):
        self.workspace = (pool, size)

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data):
        self.cache_data.append(data)
        return types.SimpleNamespace(serialize=lambda: b"timing-cache")

    def set_timing_cache(self, cache, ignore_mismatch):
        return True


def test_tensorrt10_takes_precision_and_compatibility_flags_fake():
    h100 = load_profile("h100")
    profile = dataclasses.replace(h100, precision="fp16", tensorrt=dataclasses.replace(
        h100.tensorrt, version_compatible=True, hardware_compatibility="same_compute_capability"))
    config = _FakeConfig()
    tensorrt_build._configure(_fake_full_tensorrt("10.13.0.35"), config, profile, FULL)
    assert config.flags == ["FP16", "VERSION_COMPATIBLE"]
    assert config.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY"
    assert config.workspace == ("WORKSPACE", h100.tensorrt.workspace_mib << 20)
    assert config.builder_optimization_level == h100.tensorrt.builder_optimization_level


def test_tensorrt11_is_strongly_typed_fake():
    config = _FakeConfig()
    trt = _fake_full_tensorrt("11.0.0.1")
    tensorrt_build._configure(trt, config, load_profile("h100"), FULL)
    assert config.flags == [] and FULL.strongly_typed(trt)  # precision comes from the graph
    assert not FULL.strongly_typed(_fake_full_tensorrt("10.13.0.35"))


def test_timing_cache_is_kept_per_version_and_gpu_fake(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_build, "TIMING_CACHE_DIR", tmp_path)
    platform = {"version": "10.13.0.35", "compute_capabilities": ["sm90"]}
    cache = TimingCache(FULL, load_profile("h100"), platform)
    config = _FakeConfig()
    cache.attach(config)
    cache.attach(config)  # one cache across the build's graphs
    cache.save()
    assert config.cache_data == [b""]
    assert (tmp_path / "tensorrt-10.13.0.35-sm90.cache").read_bytes() == b"timing-cache"
    again = _FakeConfig()
    TimingCache(FULL, load_profile("h100"), platform).attach(again)
    assert again.cache_data == [b"timing-cache"]
    rtx = TimingCache(RTX, load_profile("rtx4090"), platform)  # TensorRT-RTX ignores it
    rtx.attach(config)
    rtx.save()
    assert rtx.path is None and len(list(tmp_path.iterdir())) == 1


# --- the real TensorRT-RTX builder ---------------------------------------------------------------

def _contract(path: Path) -> dict[str, dict[str, tuple[tuple[str, ...], str]]]:
    """{graph: {tensor: (shape symbols, dtype)}} from the I/O tables of docs/graphs.md, and
    verify's from the SpecVerify spec; `{i}` names are kept as patterns."""
    tables: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {}
    graph = None
    for line in (DOCS / "graphs.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## `(\w+)\.onnx`", line)
        if heading:
            graph = heading.group(1)
            tables[graph] = {}
        row = re.match(r"^\| (?:in|out) ((?:`[^`]+`(?:, )?)+) \| `\[([^\]]*)\]` \| (\w+) \|", line)
        if row and graph:
            for name in re.findall(r"`([^`]+)`", row.group(1)):
                tables[graph][name] = (tuple(s.strip() for s in row.group(2).split(",")),
                                       row.group(3))
    tables["verify"] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = re.match(r"^\| `(\w+)` \| `\[([^\]]*)\]` \| (\w+)", line)
        if row:
            tables["verify"][row.group(1)] = (tuple(s.strip() for s in row.group(2).split(",")),
                                              row.group(3))
    return tables


def _expected(tables, graph: str, tensor: str, info: dict) -> tuple[list[int], str] | None:
    """The shape (-1 where dynamic) and dtype docs/graphs.md gives `tensor` of `graph`."""
    for pattern, (symbols, dtype) in tables[graph].items():
        if re.fullmatch(re.escape(pattern).replace(r"\{i\}", r"\d+"), tensor):
            break
    else:
        return None
    t, d = info["target"], info["draft"]
    sizes = {"G": info["gamma"], "V": t["vocab_size"], "Vd": t["vocab_size"],
             "Hk": t["num_kv_heads"], "D": t["head_dim"], "Hkd": d["num_kv_heads"],
             "Dd": d["head_dim"], "F": d["feature_size"], "d": d["hidden_size"]}
    if graph == "verify":  # one engine serves every gamma and vocabulary
        sizes = {}
    model = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[info["precision"]]
    return [sizes.get(s, -1) for s in symbols], model if dtype == "model" else dtype


def _require_rtx():
    pytest.importorskip("tensorrt_rtx_bindings", reason=NO_RTX)


@pytest.fixture(scope="module")
def rtx_export(tmp_path_factory) -> Path:
    """The tiny pair exported in fp16, as the rtx4090 profile exports it."""
    _require_rtx()
    return export_tiny_pair(tmp_path_factory.getbasetemp(), precision="fp16")


def _reusing_export(monkeypatch: pytest.MonkeyPatch, export: Path) -> None:
    """`build` exports the pair again; give it a copy of `export` instead (same files)."""
    fake = types.ModuleType("dspark_export.export")
    fake.export_graphs = lambda t, d, out, **kw: Path(shutil.copytree(export, out))
    monkeypatch.setitem(sys.modules, "dspark_export.export", fake)


@pytest.fixture(scope="module")
def rtx_bundle(rtx_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rtx") / "bundle"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _reusing_export(monkeypatch, rtx_export)
        return pipeline.build_bundle(load_profile("rtx4090"), None, None, out, progress=False)


@pytest.mark.tensorrt_rtx
def test_rtx_bundle_holds_real_engines_matching_the_graph_contract(rtx_bundle, rtx_export):
    from dspark_runtime.bundle import GRAPH_NAMES, read_manifest, sha256_file

    manifest = read_manifest(rtx_bundle)
    info = json.loads((rtx_export / "export.json").read_text())
    section = manifest["tensorrt"]
    import tensorrt_rtx_bindings

    assert manifest["backend"] == "tensorrt-rtx"
    assert section["builder"] == "TensorRT-RTX"
    assert section["version"] == tensorrt_rtx_bindings.__version__
    assert section["compute_capabilities"] == ["sm89"] and section["strongly_typed"]
    assert section["spec_verify"] == "native-layers" and section["plugins"] == []
    assert "sps_table" in manifest["notes"] and "sps_table" not in manifest.get("files", {})
    tables = _contract(SPEC)
    for name in GRAPH_NAMES:
        engine = section["engines"][name]
        path = rtx_bundle / engine["file"]
        assert path.stat().st_size == engine["bytes"] > 100_000  # a real plan, not a stub
        assert manifest["files"][engine["file"]] == sha256_file(path)
        assert engine["network_layers"] > 0 and engine["engine_layers"] > 0
        exported = onnx.load(str(rtx_export / f"{name}.onnx"), load_external_data=False)
        for kind, tensors, graph_values in (("inputs", engine["inputs"], exported.graph.input),
                                            ("outputs", engine["outputs"],
                                             exported.graph.output)):
            assert [t["name"] for t in tensors] == [v.name for v in graph_values], (name, kind)
            for tensor in tensors:
                want = _expected(tables, name, tensor["name"], info)
                assert want is not None, f"{name}: {tensor['name']} is not in docs/graphs.md"
                assert [tensor["shape"], tensor["dtype"]] == list(want), (name, tensor)
        labels = [p["name"] for p in engine["optimization_profiles"]]
        assert labels == (["prefill", "verify"] if name in ("target", "draft") else ["verify"])
        for opt in engine["optimization_profiles"]:
            assert set(opt["shapes"]) == {t["name"] for t in engine["inputs"]}
            for tensor in engine["inputs"]:
                lo, mid, hi = (np.array(s) for s in opt["shapes"][tensor["name"]])
                static = np.array(tensor["shape"]) >= 0
                assert (lo <= mid).all() and (mid <= hi).all()
                assert (lo[static] == np.array(tensor["shape"])[static]).all()
                assert (hi[static] == lo[static]).all()
        verify = engine["optimization_profiles"][-1]["shapes"]
        first = verify[engine["inputs"][0]["name"]]
        assert first[2][0] == manifest["shapes"]["max_batch"]  # rows up to max_batch
    target_verify = section["engines"]["target"]["optimization_profiles"][1]["shapes"]
    assert target_verify["input_ids"][2] == [manifest["shapes"]["max_batch"], info["gamma"] + 1]


@pytest.mark.tensorrt_rtx
def test_inspect_and_run_on_a_machine_without_the_gpu(rtx_bundle):
    from dspark_export.cli import main
    from dspark_runtime.gpu import gpu_info

    if gpu_info() is not None:
        pytest.skip("a CUDA GPU is visible: the refusal cannot be shown here")
    result = CliRunner().invoke(main, ["inspect", str(rtx_bundle)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"TensorRT-RTX \S+\s+targets sm89", out)
    assert re.search(r"target\s+target\.engine\s+[\d.]+ MiB\s+layers \d+ network / \d+ engine",
                     out)
    assert "profile  verify: input_ids [1, 1]..[16, 5]" in out
    assert "runnable here: NO" in out and "sm89 (Ada: RTX 40xx, L4, L40S)" in out
    result = CliRunner().invoke(main, ["run", str(rtx_bundle), "--prompt", "hi"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "no CUDA GPU" in lines[0] and "sm89" in lines[0]


@pytest.mark.tensorrt_rtx
def test_parse_failure_names_the_graph_node_and_op(rtx_export, tmp_path):
    from dspark_plugins.spec_verify.onnx_function import strip_function

    export = Path(shutil.copytree(rtx_export, tmp_path / "export"))
    verify = onnx.load(str(export / "verify.onnx"))
    onnx.save(strip_function(verify), str(export / "verify.onnx"))  # no body, no plugin here
    node = verify.graph.node[0].name
    out = tmp_path / "engines"
    out.mkdir()
    with pytest.raises(TensorRTBuildError) as err:
        build_engines(export, load_profile("rtx4090"), out)
    message = str(err.value)
    assert message.startswith("verify.onnx: the ONNX parser failed")
    assert f"node '{node}' (op SpecVerify)" in message and "Plugin not found" in message


@pytest.mark.tensorrt_rtx
def test_interrupted_build_leaves_no_bundle(rtx_export, tmp_path, monkeypatch):
    _reusing_export(monkeypatch, rtx_export)
    real = tensorrt_build.build_engine

    def interrupt_at_markov(*args, **kwargs):
        if args[4] == "markov":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tensorrt_build, "build_engine", interrupt_at_markov)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_bundle(load_profile("rtx4090"), None, None, tmp_path / "B",
                              progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tensorrt_rtx
def test_one_rtx_plan_for_several_targets(rtx_export, tmp_path):
    rtx = load_profile("rtx")
    profile = dataclasses.replace(rtx, tensorrt=dataclasses.replace(
        rtx.tensorrt, compute_capabilities=("sm86", "sm120")))
    out = tmp_path / "engines"
    out.mkdir()
    info = build_engines(rtx_export, profile, out)
    assert info["compute_capabilities"] == ["sm86", "sm120"]
    assert all((out / e["file"]).stat().st_size > 100_000 for e in info["engines"].values())


@pytest.mark.tensorrt_rtx
@pytest.mark.slow
def test_reference_pair_builds_for_rtx4090(tmp_path):
    """The README's command: the embedded reference pair, built for the RTX 4090."""
    _require_rtx()
    from dspark_export.cli import main

    result = CliRunner().invoke(main, ["build", "--profile", "rtx4090", "--out",
                                       str(tmp_path / "B")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "B" / "manifest.json").read_text())
    engines = manifest["tensorrt"]["engines"]
    assert sorted(engines) == ["draft", "markov", "target", "verify"]
    assert engines["target"]["bytes"] > 100 << 20  # 135M parameters in fp16
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "B")])
    assert result.exit_code == 0 and "target.engine" in result.output


# --- full TensorRT for real (skipped where it is absent) -----------------------------------------

@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_build_and_run(tmp_path):
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    from dspark_runtime.gpu import gpu_info

    gpu = gpu_info()
    if gpu is None:
        pytest.skip("tensorrt is installed but no CUDA GPU is visible")
    major, minor = gpu["compute_capability"].split(".")
    h100 = load_profile("h100")
    profile = dataclasses.replace(h100, max_context=64, tensorrt=dataclasses.replace(
        h100.tensorrt, compute_capability=f"sm{major}{minor}",
        compute_capabilities=(f"sm{major}{minor}",), prefill_tokens=TokenRange(1, 8, 32),
        timing_cache=False))
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
