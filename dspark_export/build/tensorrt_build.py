"""TensorRT backend build: one serialized engine per exported graph.

Written against the documented TensorRT 10 and 11 Python API; tensorrt is imported lazily and
checked (with a GPU of the profile's compute capability) before anything is written.

- Precision comes from the exported graph: TensorRT 11 networks are always strongly typed. On
  TensorRT 10 the network is weakly typed and the profile's precision becomes a builder flag
  (FP16/BF16), so TensorRT may pick reduced-precision kernels as it did before strong typing.
- Graphs with new-token dimensions (target, and draft with its context) get two optimization
  profiles: 0 = prefill (long chunks, few rows), 1 = verify/decode (up to max_batch rows of at
  most gamma+1 tokens). Graphs whose only dynamic dimension is the batch get the verify one.
  The dynamic dimensions are recognised by the symbolic names the exporter gives them.
- verify.onnx: the SpecVerify function body is stripped, so the ONNX parser's plugin fallback
  maps the node onto the plugin that `dspark_plugins` registers.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from dspark_export.build.profiles import Profile
from dspark_runtime.backends.tensorrt import gpu_info
from dspark_runtime.bundle import GRAPH_NAMES

INSTALL_HINT = ("pip install 'dspark-export[tensorrt]' --extra-index-url https://pypi.nvidia.com "
                "(on a machine with an NVIDIA GPU and driver)")
PLUGIN = {"op": "dspark::SpecVerify", "graph": "verify", "aot": True,
          "register": "dspark_plugins.spec_verify.tensorrt_plugin:register"}
TIMING_CACHE_DIR = Path("~/.cache/dspark-export/timing")
# Symbolic dims the exporter writes (docs/graphs.md): batch rows, new tokens, KV buffer length,
# new context positions; verify.onnx spells its own B, G, G_plus_1, V.
_ROW_DIMS = {"batch", "B"}
_TOKEN_DIMS = {"new_tokens", "context"}
_PAST_DIMS = {"past"}

Range = tuple[int, int, int]


class TensorRTUnavailable(RuntimeError):
    """TensorRT, or a suitable GPU, is missing: raised before anything is written."""


class TensorRTBuildError(RuntimeError):
    """Parsing or building one graph failed; the message names the graph."""


def require_tensorrt(profile: Profile) -> dict[str, str]:
    """This machine's TensorRT version and GPU, if they can build `profile`; else raise."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"profile '{profile.name}' builds TensorRT engines, but the tensorrt package is not "
            f"installed: {INSTALL_HINT}") from exc
    gpu = gpu_info()
    if gpu is None:
        raise TensorRTUnavailable(
            f"profile '{profile.name}' builds TensorRT engines, but no CUDA GPU is visible "
            f"(cuda-python comes with the tensorrt extra: {INSTALL_HINT})")
    settings = profile.tensorrt
    here = tuple(int(x) for x in gpu["compute_capability"].split("."))
    wanted = settings.compute_capability_tuple
    if settings.hardware_compatibility == "ampere_plus":
        if here < (8, 0):
            raise TensorRTUnavailable(f"profile '{profile.name}' asks for ampere_plus engines, "
                                      f"which must be built on sm80 or newer; {gpu['name']} is "
                                      f"{gpu['compute_capability']}")
    elif here != wanted:
        raise TensorRTUnavailable(
            f"profile '{profile.name}' targets {settings.compute_capability}, but this GPU "
            f"({gpu['name']}) has compute capability {gpu['compute_capability']}: use the "
            "profile for this GPU, or a copy with its compute_capability")
    return {"version": trt.__version__, "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"]}


def optimization_profiles(graph: onnx.ModelProto, name: str, profile: Profile, gamma: int,
                          vocab: int) -> list[tuple[str, dict[str, Range]]]:
    """(label, {input: (min, opt, max) shape}) per optimization profile of graph `name`."""
    settings = profile.tensorrt
    context = profile.max_context
    verify_rows = max(1, min(profile.max_batch, round(settings.verify_tokens_opt / (gamma + 1))))
    # verify.onnx's G: a scheduler may verify fewer than gamma drafts (at least one is padded in).
    fixed = {"G": (1, gamma, gamma), "G_plus_1": (2, gamma + 1, gamma + 1), "V": (vocab,) * 3}
    p = settings.prefill_tokens
    regimes = {
        "prefill": {"rows": (1, 1, settings.prefill_max_batch), "tokens": (p.min, p.opt, p.max),
                    "past": (0, context, context)},
        "verify": {"rows": (1, verify_rows, profile.max_batch),
                   "tokens": (1, gamma + 1, gamma + 1), "past": (0, context, context)},
    }
    params = {d.dim_param for v in graph.graph.input for d in v.type.tensor_type.shape.dim}
    labels = ["prefill", "verify"] if params & _TOKEN_DIMS else ["verify"]
    out = []
    for label in labels:
        dims = regimes[label]
        shapes: dict[str, Range] = {}
        for value in graph.graph.input:
            axes = []
            for axis, d in enumerate(value.type.tensor_type.shape.dim):
                if d.dim_value > 0:
                    axes.append((d.dim_value,) * 3)
                elif d.dim_param in _ROW_DIMS:
                    axes.append(dims["rows"])
                elif d.dim_param in _TOKEN_DIMS:
                    axes.append(dims["tokens"])
                elif d.dim_param in _PAST_DIMS:
                    axes.append(dims["past"])
                elif d.dim_param in fixed:
                    axes.append(fixed[d.dim_param])
                else:
                    raise TensorRTBuildError(
                        f"{name}.onnx: input '{value.name}' axis {axis} has an "
                        f"unknown dynamic dimension {d.dim_param or '?'!r}; no optimization "
                        "profile can be derived for it")
            shapes[value.name] = tuple(tuple(a[i] for a in axes) for i in range(3))
        out.append((label, shapes))
    return out


def build_engines(onnx_dir: str | Path, profile: Profile, out_dir: str | Path,
                  on_graph: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build `<graph>.engine` for every exported graph; return the manifest's tensorrt section."""
    platform = require_tensorrt(profile)
    import tensorrt as trt

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    info = json.loads((onnx_dir / "export.json").read_text(encoding="utf-8"))
    gamma, vocab = int(info["gamma"]), int(info["target"]["vocab_size"])
    profile.check_gamma(gamma)
    strongly_typed = int(trt.__version__.split(".")[0]) >= 11
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = _timing_cache_path(profile.tensorrt.timing_cache, platform)
    cache = None
    engines = {}
    for name in GRAPH_NAMES:
        graph = _load_graph(onnx_dir / f"{name}.onnx", name)
        network = builder.create_network(0)  # TensorRT 11: always strongly typed
        parser = trt.OnnxParser(network, logger)
        parsed = (parser.parse(graph.SerializeToString()) if name == PLUGIN["graph"]
                  else parser.parse_from_file(str(onnx_dir / f"{name}.onnx")))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildError(f"{name}.onnx: TensorRT's ONNX parser failed: {errors}")
        config = builder.create_builder_config()
        _configure(trt, config, profile, strongly_typed)
        if cache_path is not None:
            cache = cache or config.create_timing_cache(
                cache_path.read_bytes() if cache_path.is_file() else b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                cache = config.create_timing_cache(b"")  # from another TensorRT or GPU
                config.set_timing_cache(cache, ignore_mismatch=False)
        shapes = optimization_profiles(graph, name, profile, gamma, vocab)
        for _, dims in shapes:
            opt_profile = builder.create_optimization_profile()
            for tensor, (lo, opt, hi) in dims.items():
                opt_profile.set_shape(tensor, lo, opt, hi)
            config.add_optimization_profile(opt_profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TensorRTBuildError(f"{name}.onnx: TensorRT could not build an engine "
                                     "(see the TensorRT log above)")
        with open(out_dir / f"{name}.engine", "wb") as handle:
            handle.write(memoryview(plan))
        engines[name] = {"file": f"{name}.engine", "optimization_profiles": [
            {"name": label, "shapes": {t: [list(s) for s in r] for t, r in dims.items()}}
            for label, dims in shapes]}
        if on_graph:
            on_graph(name)
    if cache is not None:
        _save_bytes(cache_path, memoryview(cache.serialize()))
    settings = profile.tensorrt
    return {**platform, "strongly_typed": strongly_typed,
            "precision_flag": None if strongly_typed or profile.precision == "fp32"
            else profile.precision.upper(),
            "hardware_compatibility": settings.hardware_compatibility,
            "version_compatible": settings.version_compatible,
            "builder_optimization_level": settings.builder_optimization_level,
            "plugins": [PLUGIN], "engines": engines}


def _load_graph(path: Path, name: str) -> onnx.ModelProto:
    """Inputs for the profiles; for verify, the whole graph with the function body stripped."""
    if name != PLUGIN["graph"]:
        return onnx.load(str(path), load_external_data=False)
    from dspark_plugins.spec_verify.onnx_function import strip_function
    from dspark_plugins.spec_verify.tensorrt_plugin import register

    register()
    return strip_function(onnx.load(str(path)), aot=PLUGIN["aot"])


def _configure(trt: Any, config: Any, profile: Profile, strongly_typed: bool) -> None:
    settings = profile.tensorrt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_optimization_level
    if not strongly_typed and profile.precision != "fp32":
        config.set_flag(getattr(trt.BuilderFlag, profile.precision.upper()))
    if settings.hardware_compatibility != "none":
        level = settings.hardware_compatibility.upper()
        if not hasattr(trt.HardwareCompatibilityLevel, level):
            raise TensorRTUnavailable(f"hardware_compatibility {settings.hardware_compatibility} "
                                      f"needs a newer TensorRT than {trt.__version__}")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _timing_cache_path(setting: bool | str, platform: dict[str, str]) -> Path | None:
    """Per TensorRT version and GPU: a cache from another one is not reusable."""
    if setting is False:
        return None
    if setting is True:
        sm = platform["compute_capability"].replace(".", "")
        return (TIMING_CACHE_DIR / f"trt-{platform['version']}-sm{sm}.cache").expanduser()
    return Path(setting).expanduser()


def _save_bytes(path: Path, data: memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
