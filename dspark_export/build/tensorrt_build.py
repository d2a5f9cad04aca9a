"""TensorRT build (both flavours): one serialized engine per exported graph.

The same code builds with full TensorRT (`tensorrt`, NVIDIA's index: h100, h200, jetson-orin) and
with TensorRT for RTX (`tensorrt_rtx_bindings`, PyPI: the RTX profiles); the differences are
named in dspark_runtime/backends/tensorrt/flavours.py and used here in `_configure` only.

- Precision comes from the exported graph: TensorRT-RTX and TensorRT 11 networks are always
  strongly typed. On TensorRT 10 the network is weakly typed and the profile's precision becomes
  a builder flag (FP16/BF16).
- Graphs with new-token dimensions (target, and draft with its context) get two optimization
  profiles: 0 = prefill (long chunks, few rows), 1 = verify/decode (up to max_batch rows of at
  most gamma+1 tokens). Graphs whose only dynamic dimension is the batch get the verify one.
  The dynamic dimensions are recognised by the symbolic names the exporter gives them.
- verify.onnx: the `dspark::SpecVerify` node carries an ONNX function body, which the parser
  inlines as native layers; with `spec_verify: plugin` the plugin that `dspark_plugins`
  registers is chosen instead through the parser's ENABLE_PLUGIN_OVERRIDE flag. The manifest
  records which.
- TensorRT-RTX builds ahead of time for the profile's compute capabilities with no GPU here;
  full TensorRT builds for the GPU it runs on, which must be the profile's.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from dspark_export.build.profiles import Profile
from dspark_runtime.backends import BackendUnavailable
from dspark_runtime.backends.tensorrt import FLAVOURS, TensorRTFlavour, describe_targets
from dspark_runtime.bundle import GRAPH_NAMES
from dspark_runtime.draft_gate import pending_context_width
from dspark_runtime.gpu import gpu_info, sm_name

PLUGIN = {"op": "dspark::SpecVerify", "graph": "verify", "aot": True,
          "register": "dspark_plugins.spec_verify.tensorrt_plugin:register"}
TIMING_CACHE_DIR = Path("~/.cache/dspark-export/timing")
# Symbolic dims the exporter writes (docs/graphs.md): batch rows, new tokens, KV buffer length,
# new context positions; verify.onnx spells its own B, G, G_plus_1, V.
_ROW_DIMS = {"batch", "B"}
_TOKEN_DIMS = {"new_tokens", "context"}
_CONTEXT_DIM = "context"
_PAST_DIMS = {"past"}

# TensorRT DataType names -> the names docs/graphs.md and numpy use.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64",
                "INT32": "int32", "INT8": "int8", "BOOL": "bool", "FP8": "float8"}

Range = tuple[int, int, int]


class TensorRTBuildError(RuntimeError):
    """Parsing or building one graph failed; the message names the graph (and node, op)."""


def require_builder(profile: Profile) -> dict[str, Any]:
    """What this machine builds `profile` with (flavour version, targets, GPU); raises
    BackendUnavailable before anything is written when it cannot."""
    flavour = FLAVOURS[profile.backend]
    trt = flavour.import_module()
    settings = profile.tensorrt
    if flavour.aot_targets is not None:  # TensorRT-RTX: ahead of time, no GPU needed
        return {"version": trt.__version__, "gpu_name": None,
                "compute_capabilities": list(settings.compute_capabilities)}
    gpu = gpu_info()
    if gpu is None:
        raise BackendUnavailable(
            f"profile '{profile.name}' builds {flavour.title} engines, which needs a CUDA GPU of "
            f"compute capability {describe_targets([settings.compute_capability])} here; none "
            f"is visible (cuda-python comes with the tensorrt extra: {flavour.install_hint})")
    here = tuple(int(x) for x in gpu["compute_capability"].split("."))
    if settings.hardware_compatibility == "ampere_plus":
        if here < (8, 0):
            raise BackendUnavailable(
                f"profile '{profile.name}' asks for ampere_plus engines, which must be built on "
                f"sm80 or newer; {gpu['name']} is {gpu['compute_capability']}")
    elif here != settings.compute_capability_tuple:
        raise BackendUnavailable(
            f"profile '{profile.name}' targets {settings.compute_capability}, but this GPU "
            f"({gpu['name']}) has compute capability {gpu['compute_capability']}: use the "
            "profile for this GPU, or a copy with its compute_capability")
    return {"version": trt.__version__, "gpu_name": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "compute_capabilities": [sm_name(gpu["compute_capability"])]}


def optimization_profiles(graph: onnx.ModelProto, name: str, profile: Profile, gamma: int,
                          vocab: int) -> list[tuple[str, dict[str, Range]]]:
    """(label, {input: (min, opt, max) shape}) per optimization profile of graph `name`."""
    settings = profile.tensorrt
    context = profile.max_context
    verify_rows = max(1, min(profile.max_batch, round(settings.verify_tokens_opt / (gamma + 1))))
    # verify.onnx's G: a scheduler may verify fewer than gamma drafts (at least one is padded in).
    fixed = {"G": (1, gamma, gamma), "G_plus_1": (2, gamma + 1, gamma + 1), "V": (vocab,) * 3}
    p = settings.prefill_tokens
    # In decode the draft takes the context of the tokens accepted since its last run: one
    # round's, or more after rounds that skipped drafting (dspark_runtime.draft_gate).
    regimes = {
        "prefill": {"rows": (1, 1, settings.prefill_max_batch), "tokens": (p.min, p.opt, p.max),
                    "context": (p.min, p.opt, p.max), "past": (0, context, context)},
        "verify": {"rows": (1, verify_rows, profile.max_batch),
                   "tokens": (1, gamma + 1, gamma + 1),
                   "context": (1, gamma + 1, pending_context_width(gamma)),
                   "past": (0, context, context)},
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
                elif d.dim_param == _CONTEXT_DIM:
                    axes.append(dims["context"])
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
    platform = require_builder(profile)
    flavour = FLAVOURS[profile.backend]
    trt = flavour.import_module()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    info = json.loads((onnx_dir / "export.json").read_text(encoding="utf-8"))
    gamma, vocab = int(info["gamma"]), int(info["target"]["vocab_size"])
    profile.check_gamma(gamma)
    plugin = profile.tensorrt.spec_verify == "plugin"
    if plugin:
        _register_plugin(flavour, profile)
    logger = build_log(trt)
    builder = trt.Builder(logger)
    cache = TimingCache(flavour, profile, platform)
    engines = {}
    for name in GRAPH_NAMES:
        engines[name] = build_engine(trt, builder, logger, onnx_dir / f"{name}.onnx", name,
                                     profile, gamma, vocab, out_dir, flavour, cache,
                                     plugin=plugin and name == PLUGIN["graph"])
        if on_graph:
            on_graph(name)
    cache.save()
    settings = profile.tensorrt
    strongly_typed = flavour.strongly_typed(trt)
    return {**platform, "builder": flavour.title, "module": flavour.module,
            "strongly_typed": strongly_typed,
            "precision_flag": None if strongly_typed or profile.precision == "fp32"
            else profile.precision.upper(),
            "hardware_compatibility": settings.hardware_compatibility,
            "version_compatible": settings.version_compatible,
            "builder_optimization_level": settings.builder_optimization_level,
            "spec_verify": "plugin" if plugin else "native-layers",
            "plugins": [PLUGIN] if plugin else [], "engines": engines}


def build_engine(trt: Any, builder: Any, logger: Any, path: Path, name: str,
                 profile: Profile, gamma: int, vocab: int, out_dir: Path,
                 flavour: TensorRTFlavour, cache: TimingCache, *, plugin: bool = False
                 ) -> dict[str, Any]:
    """Parse, configure and build one graph into `out_dir/<name>.engine`; its manifest entry."""
    start = time.perf_counter()
    network, _parser = parse_network(trt, builder, logger, path, name, plugin=plugin)
    config = builder.create_builder_config()
    _configure(trt, config, profile, flavour)
    cache.attach(config)
    shapes = optimization_profiles(onnx.load(str(path), load_external_data=False), name,
                                   profile, gamma, vocab)
    for _, dims in shapes:
        opt_profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in dims.items():
            opt_profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    logger.start()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{name}.onnx: {flavour.title} could not build an engine: "
                                 f"{logger.errors() or 'see the log above'}")
    engine = out_dir / f"{name}.engine"
    with open(engine, "wb") as handle:
        handle.write(memoryview(plan))
    return {"file": engine.name, "bytes": engine.stat().st_size,
            "build_seconds": round(time.perf_counter() - start, 2),
            "network_layers": network.num_layers, "engine_layers": logger.engine_layers(),
            "inputs": _tensors(network, network.num_inputs, network.get_input),
            "outputs": _tensors(network, network.num_outputs, network.get_output),
            "optimization_profiles": [
                {"name": label, "shapes": {t: [list(s) for s in r] for t, r in dims.items()}}
                for label, dims in shapes]}


def parse_network(trt: Any, builder: Any, logger: Any, path: Path, name: str, *,
                  plugin: bool = False) -> tuple[Any, Any]:
    """The parsed network and its parser; a failure names the graph, the node and its op."""
    network = builder.create_network(0)  # strongly typed where the flavour always is
    parser = trt.OnnxParser(network, logger)
    if plugin:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(path)):
        raise TensorRTBuildError(f"{name}.onnx: the ONNX parser failed: "
                                 + "; ".join(_parser_error(parser.get_error(i))
                                             for i in range(parser.num_errors)))
    network.name = name
    return network, parser  # the parser holds the weights the network refers to


def _parser_error(error: Any) -> str:
    node, op = error.node_name(), error.node_operator()
    where = f"node '{node}' (op {op})" if node or op else f"node #{error.node()}"
    return f"{where}: {error.desc()}"


def _tensors(network: Any, count: int, get: Callable[[int], Any]) -> list[dict[str, Any]]:
    return [{"name": t.name, "dtype": _DTYPE_NAMES.get(t.dtype.name, t.dtype.name.lower()),
             "shape": [int(d) for d in t.shape]} for t in (get(i) for i in range(count))]


def _configure(trt: Any, config: Any, profile: Profile, flavour: TensorRTFlavour) -> None:
    settings = profile.tensorrt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer information in the log
    if flavour.aot_targets is not None:
        targets = settings.compute_capabilities
        config.num_compute_capabilities = len(targets)
        for i, sm in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, sm.upper()), i)
        return
    if not flavour.strongly_typed(trt) and profile.precision != "fp32":
        config.set_flag(getattr(trt.BuilderFlag, profile.precision.upper()))
    if settings.hardware_compatibility != "none":
        level = settings.hardware_compatibility.upper()
        if not hasattr(trt.HardwareCompatibilityLevel, level):
            raise BackendUnavailable(f"hardware_compatibility {settings.hardware_compatibility} "
                                     f"needs a newer TensorRT than {trt.__version__}")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)


def _register_plugin(flavour: TensorRTFlavour, profile: Profile) -> None:
    if not flavour.has_plugin_api:
        raise BackendUnavailable(f"profile '{profile.name}': spec_verify: plugin needs the "
                                 f"tensorrt.plugin module, which {flavour.title} lacks")
    from dspark_plugins.spec_verify.tensorrt_plugin import register

    register()


_ENGINE_LAYER = re.compile(r"^Name: ", re.M)


def build_log(trt: Any) -> Any:
    """A logger (an `ILogger` of these bindings) that keeps, per build, the errors (raised with
    the graph's name) and the engine's layer list from the VERBOSE log: the only place that
    list exists without a GPU (the engine inspector needs one)."""

    class BuildLog(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            bad = severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            if bad or msg.startswith("Layers:"):
                self.messages.append((bad, msg))

        def start(self) -> None:
            self.messages = []

        def errors(self) -> str:
            return "; ".join(m for bad, m in self.messages if bad)

        def engine_layers(self) -> int | None:
            layers = [m for bad, m in self.messages if not bad]
            return len(_ENGINE_LAYER.findall(layers[-1])) if layers else None

    return BuildLog()


class TimingCache:
    """One timing cache across a build's graphs, per flavour version and GPU (a cache from
    another one is not reusable); a no-op where the flavour has none or the profile says so."""

    def __init__(self, flavour: TensorRTFlavour, profile: Profile, platform: dict[str, Any]):
        setting = profile.tensorrt.timing_cache
        self.path: Path | None = None
        self.cache: Any = None
        if not flavour.has_timing_cache or setting is False:
            return
        if setting is True:
            sm = platform["compute_capabilities"][0]
            name = f"{flavour.module}-{platform['version']}-{sm}.cache"
            self.path = (TIMING_CACHE_DIR / name).expanduser()
        else:
            self.path = Path(setting).expanduser()

    def attach(self, config: Any) -> None:
        if self.path is None:
            return
        if self.cache is None:
            self.cache = config.create_timing_cache(
                self.path.read_bytes() if self.path.is_file() else b"")
        if not config.set_timing_cache(self.cache, ignore_mismatch=False):
            self.cache = config.create_timing_cache(b"")  # from another version or GPU
            config.set_timing_cache(self.cache, ignore_mismatch=False)

    def save(self) -> None:
        if self.path is None or self.cache is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(memoryview(self.cache.serialize()))
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


class TensorRTBuilder:
    """The build pipeline's view of one flavour (registry: dspark_runtime.backends)."""

    def __init__(self, flavour: TensorRTFlavour) -> None:
        self.flavour = flavour

    def require(self, profile: Profile) -> None:
        require_builder(profile)

    def sps_unmeasurable(self, profile: Profile) -> str | None:
        """Why SPS(B) cannot be timed here: TensorRT-RTX builds without a GPU, and an engine
        runs only on one of its targets."""
        gpu = gpu_info()
        targets = profile.tensorrt.compute_capabilities
        if gpu is None:
            return (f"built ahead of time with no GPU; time it on a {describe_targets(targets)} "
                    "GPU by rebuilding there")
        if self.flavour.aot_targets is not None and sm_name(gpu["compute_capability"]) \
                not in targets:
            return f"the build machine's GPU ({gpu['name']}) is not a target of the engines"
        return None

    def build(self, export_dir: Path, profile: Profile, root: Path, graphs: Any,
              on_graph: Callable[[str], None] | None = None) -> dict[str, Any]:
        info = build_engines(export_dir, profile, root, on_graph)
        return {"graphs": {n: e["file"] for n, e in info["engines"].items()},
                "session_options": None, "tensorrt": info}

    @staticmethod
    def timing_section(manifest_parts: dict[str, Any]) -> dict[str, Any]:
        return manifest_parts["tensorrt"]


def full_tensorrt_builder() -> TensorRTBuilder:
    return TensorRTBuilder(FLAVOURS["tensorrt"])


def tensorrt_rtx_builder() -> TensorRTBuilder:
    return TensorRTBuilder(FLAVOURS["tensorrt-rtx"])
