"""Hardware profiles: every shipped one validates, and bad fields are named with their file."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from dspark_export.build.profiles import (Profile, ProfileError, list_profiles, load_profile,
                                          profiles_dir)

SHIPPED = ["a100", "cpu", "cuda-ort", "h100", "h200", "jetson-orin", "l4", "l40s", "rtx",
           "rtx4090", "rtx5090"]
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")


def test_list_profiles_has_every_target():
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_validates(name):
    profile = load_profile(name)
    assert isinstance(profile, Profile) and profile.name == name
    assert (profile.onnxruntime is None) == (profile.backend in TENSORRT_BACKENDS)
    if profile.backend in TENSORRT_BACKENDS:
        trt = profile.tensorrt
        assert trt.prefill_tokens.max <= profile.max_context
        assert trt.verify_tokens_opt <= profile.verify_tokens_max(profile.gamma_max)
    assert profile.to_dict()["name"] == name


def test_precisions_fit_the_hardware():
    assert load_profile("cpu").precision == "fp32"
    assert load_profile("jetson-orin").precision == "fp16"
    for name in ("h100", "h200", "a100"):
        assert load_profile(name).precision == "bf16"
    assert {load_profile(n).tensorrt.compute_capability for n in ("h100", "a100", "l4",
                                                                   "jetson-orin")} == \
        {"sm90", "sm80", "sm89", "sm87"}


def test_each_gpu_gets_the_builder_that_can_target_it():
    """Hopper and Jetson need full TensorRT; the cards TensorRT-RTX targets get TensorRT-RTX."""
    for name in ("h100", "h200", "jetson-orin"):
        assert load_profile(name).backend == "tensorrt"
    for name, targets in (("rtx4090", ("sm89",)), ("l4", ("sm89",)), ("l40s", ("sm89",)),
                          ("a100", ("sm80",)), ("rtx5090", ("sm120",))):
        profile = load_profile(name)
        assert profile.backend == "tensorrt-rtx" and profile.tensorrt.compute_capabilities == \
            targets, name
    assert len(load_profile("rtx").tensorrt.compute_capabilities) > 1  # one plan, many GPUs


@pytest.mark.parametrize("sm, fits", [("sm90", "profiles h100 and h200"),
                                      ("sm87", "profile jetson-orin")])
def test_tensorrt_rtx_refuses_targets_it_cannot_build(tmp_path, sm, fits):
    path = _write(tmp_path, "rtx4090", _set("tensorrt", "compute_capability", value=["sm89", sm]))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert f"not {sm}" in message and fits in message and "dspark-export[tensorrt]" in message
    assert str(path) in message and "'tensorrt.compute_capability'" in message


def test_load_by_path_and_name_from_file(tmp_path):
    data = yaml.safe_load((profiles_dir() / "cpu.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    profile = load_profile(path)
    assert profile.name == "mine" and profile.source == str(path)
    assert load_profile(str(path)).max_batch == data["max_batch"]


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ProfileError, match="unknown profile 'h900'.*h100"):
        load_profile("h900")


def _write(tmp_path: Path, base: str, edit) -> Path:
    data = yaml.safe_load((profiles_dir() / f"{base}.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(*keys, value):
    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = value
    return edit


def _delete(*keys):
    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        del data[keys[-1]]
    return edit


@pytest.mark.parametrize("base, edit, field, why", [
    ("h100", _set("max_batchh", value=3), "max_batchh", "is unknown"),
    ("h100", _set("tensorrt", "workspace", value=3), "tensorrt.workspace", "is unknown"),
    ("h100", _set("max_batch", value="64"), "max_batch", "must be int"),
    ("h100", _set("max_batch", value=True), "max_batch", "must be int"),
    ("h100", _set("max_batch", value=0), "max_batch", "must be in 1..4096"),
    ("h100", _set("precision", value="int4"), "precision", "must be one of fp32, fp16, bf16"),
    ("h100", _set("backend", value="tvm"), "backend", "must be one of"),
    ("h100", _delete("max_context"), "max_context", "is required"),
    ("h100", _set("tensorrt", "prefill_tokens", "opt", value=9000), "tensorrt.prefill_tokens.opt",
     "must be in 1..8192"),
    ("h100", _set("tensorrt", "prefill_tokens", "opt", value=4096), "tensorrt.prefill_tokens.opt",
     r"must lie in min..max \(1..2048\)"),
    ("h100", _set("tensorrt", "builder_optimization_level", value=7),
     "tensorrt.builder_optimization_level", "must be in 0..5"),
    ("h100", _set("tensorrt", "hardware_compatibility", value="any"),
     "tensorrt.hardware_compatibility", "must be one of"),
    ("jetson-orin", _set("tensorrt", "hardware_compatibility", value="ampere_plus"),
     "tensorrt.hardware_compatibility", "JetPack"),
    ("h100", _set("tensorrt", "compute_capability", value="hopper"),
     "tensorrt.compute_capability", "must look like sm80"),
    ("h100", _set("tensorrt", "version_compatible", value="yes"), "tensorrt.version_compatible",
     "must be boolean"),
    ("h100", _set("tensorrt", "verify_tokens_opt", value=64 * 17 + 1), "tensorrt.verify_tokens_opt",
     "must be in 1..1088"),
    ("h100", _set("gamma", "max", value=0), "gamma.max", "must be in 1..32"),
    ("cpu", _set("draft_vocab", value=-1), "draft_vocab", "must be in 0..16777216"),
    ("cpu", _set("onnxruntime", "graph_optimization_level", value="all"),
     "onnxruntime.graph_optimization_level", "hardware-specific"),
    ("cpu", _set("onnxruntime", "execution_providers", value=["CUDA"]),
     "onnxruntime.execution_providers", "provider names"),
    ("cpu", _set("precision", value="bf16"), "precision", "bf16 is not supported"),
    ("cpu", _set("onnxruntime", "contrib_fusions", value="yes"), "onnxruntime.contrib_fusions",
     "must be bool"),
    ("cuda-ort", _set("onnxruntime", "contrib_fusions", value=True),
     "onnxruntime.contrib_fusions", "CPU provider only"),
    ("cpu", _set("tensorrt", value={}), "tensorrt", "does not apply"),
    ("h100", _set("tensorrt", "compute_capability", value=["sm90", "sm89"]),
     "tensorrt.compute_capability", "full TensorRT builds for one GPU"),
    ("rtx4090", _set("tensorrt", "compute_capability", value=["sm89", "sm89"]),
     "tensorrt.compute_capability", "lists a target twice"),
    ("rtx4090", _set("tensorrt", "timing_cache", value=True), "tensorrt.timing_cache",
     "ignores the timing cache"),
    ("rtx4090", _set("tensorrt", "spec_verify", value="plugin"), "tensorrt.spec_verify",
     "no tensorrt.plugin module"),
    ("rtx4090", _set("tensorrt", "version_compatible", value=True),
     "tensorrt.version_compatible", "no version-compatible engines"),
    ("rtx4090", lambda d: (_set("tensorrt", "compute_capability", value="sm75")(d),
                           _set("precision", value="bf16")(d)), "precision", "fp16 only"),
])
def test_bad_field_is_named(tmp_path, base, edit, field, why):
    path = _write(tmp_path, base, edit)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert re.search(why, message), message


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="must be a mapping"):
        load_profile(path)


def test_gamma_outside_profile_range():
    with pytest.raises(ProfileError, match="gamma .* is 17, outside"):
        load_profile("h100").check_gamma(17)


def test_cuda_ort_profile():
    """ONNX Runtime on the CUDA provider: fp16 graphs, CUDA first with the CPU as fallback."""
    profile = load_profile("cuda-ort")
    assert (profile.backend, profile.precision) == ("onnxruntime", "fp16")
    assert profile.onnxruntime.execution_providers == ("CUDAExecutionProvider",
                                                       "CPUExecutionProvider")
    assert profile.max_batch >= 32 and profile.max_context >= 2048
    assert profile.to_dict()["onnxruntime"]["execution_providers"][0] == "CUDAExecutionProvider"


def test_cuda_ort_builds_without_the_cuda_provider(tmp_path, monkeypatch):
    """Without onnxruntime-gpu the portable graphs still build, and the SPS table says it was
    measured on the CPU provider (with a warning), never that it describes a GPU."""
    import sys
    import types

    import onnxruntime as ort

    from dspark_export.build import pipeline
    from dspark_runtime.bundle import Bundle
    from test_bundle import make_tiny_export

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider is offered here")
    fake = types.ModuleType("dspark_export.export")
    fake.export_graphs = lambda t, d, out, *, precision="fp32", opset=18, draft_vocab=0, \
        on_step=None: make_tiny_export(out)
    monkeypatch.setitem(sys.modules, "dspark_export.export", fake)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider is not offered"):
        # The tiny hand-made graphs are fp32 whatever the precision: build them as fp32.
        profile = dataclasses.replace(load_profile("cuda-ort"), precision="fp32")
        out = pipeline.build_bundle(profile, None, None, tmp_path / "b", progress=False)
    bundle = Bundle.load(out)
    assert bundle.session_options["providers"][0] == "CUDAExecutionProvider"
    assert bundle.session_options["offline"]["graph_optimization_level"] == "ORT_ENABLE_BASIC"
    table = json.loads(bundle.sps_table_path.read_text())
    assert table["device"].startswith("CPU (") and "not available at build time" in table["device"]
    assert table["points"][-1]["tokens"] == 32 * (table["gamma"] + 1)
