"""ONNX Runtime backend build: graphs optimised offline, and the session settings to load them.

ONNX Runtime can save the graph it optimised (`SessionOptions.optimized_model_filepath`), so the
fusions run once at build time instead of at every start. Only levels up to "extended" are
saved: "all" adds layout transforms that ORT marks as specific to the machine that ran them, so
those are left to the session that loads the bundle. Extended fusions are assigned per
execution provider; when a provider the profile names is missing on the build machine, the
saved graph gets the provider-independent "basic" level only.

A profile with `contrib_fusions` first rewrites the target into ORT's fused CPU kernels
(ort_fusions.py: RMSNorm, rotary embedding, packed projections).

verify.onnx holds one `dspark::SpecVerify` node with an ONNX function body: ORT inlines local
functions when it loads a model, before optimising, so the saved graph is plain standard ops.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from dspark_export.build.ort_fusions import fuse_for_cpu
from dspark_export.build.profiles import Profile

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}
# Level the bundle is loaded with: applies whatever could not be saved offline, on the
# machine that runs it (a near no-op for what was already fused).
LOAD_LEVEL = "ORT_ENABLE_ALL"
# Weights go to `<graph>.onnx.data` when the export did so, or when the graph is this large.
_EXTERNAL_ABOVE_BYTES = 1 << 30
_EXTERNAL_MIN_TENSOR_BYTES = 1024


def optimize_graphs(onnx_dir: Path, profile: Profile, out_dir: Path, graphs: Iterable[str],
                    on_graph: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write each `<graph>.onnx` optimised offline into `out_dir`; return the session options
    the manifest records for loading them."""
    settings = profile.onnxruntime
    assert settings is not None, f"profile {profile.name} is not an onnxruntime profile"
    available = set(ort.get_available_providers())
    providers = [p for p in settings.execution_providers if p in available]
    level = settings.graph_optimization_level
    if len(providers) < len(settings.execution_providers) and level == "extended":
        level = "basic"
    fused: dict[str, int] = {}
    for name in graphs:
        src, dst = onnx_dir / f"{name}.onnx", out_dir / f"{name}.onnx"
        args = (_LEVELS[level], providers or ["CPUExecutionProvider"], settings.intra_op_threads)
        if name == "target" and settings.contrib_fusions:
            with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
                # a verify pass pads every row to the widest: a row at the last position
                # of its context runs up to gamma_max padded positions beyond it
                fused = fuse_for_cpu(src, Path(scratch) / src.name,
                                     max_positions=profile.max_context + profile.gamma_max + 1)
                _optimize(Path(scratch) / src.name, dst, *args)
        else:
            _optimize(src, dst, *args)
        if on_graph:
            on_graph(name)
    offline = {"graph_optimization_level": _LEVELS[level].name,
               "providers": providers or ["CPUExecutionProvider"],
               "onnxruntime": ort.__version__}
    if fused:
        offline["contrib_fusions"] = {"target": fused}
    return {
        "providers": list(settings.execution_providers),
        "graph_optimization_level": LOAD_LEVEL,
        "intra_op_num_threads": settings.intra_op_threads,
        "offline": offline,
    }


def _optimize(src: Path, dst: Path, level: ort.GraphOptimizationLevel, providers: list[str],
              threads: int) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(dst)
    if _has_external_data(src) or src.stat().st_size > _EXTERNAL_ABOVE_BYTES:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{dst.name}.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(_EXTERNAL_MIN_TENSOR_BYTES))
    # Creating the session is what optimises and saves; it is dropped right away.
    ort.InferenceSession(str(src), options, providers=providers)
    if not dst.is_file():
        raise RuntimeError(f"ONNX Runtime did not write the optimised graph for {src.name}")


def _has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


class OnnxRuntimeBuilder:
    """The build pipeline's view of this backend (registry: dspark_runtime.backends)."""

    def require(self, profile: Profile) -> None:
        """Nothing to check before the export: onnxruntime is a dependency."""

    def sps_unmeasurable(self, profile: Profile) -> str | None:
        return None

    def build(self, export_dir: Path, profile: Profile, root: Path, graphs: Iterable[str],
              on_graph: Callable[[str], None] | None = None) -> dict[str, Any]:
        """The manifest's graphs and session options for the optimised graphs in `root`."""
        graphs = list(graphs)
        options = optimize_graphs(export_dir, profile, root, graphs, on_graph)
        return {"graphs": {n: f"{n}.onnx" for n in graphs}, "session_options": options,
                "tensorrt": None}

    @staticmethod
    def timing_section(manifest_parts: dict[str, Any]) -> dict[str, Any]:
        return manifest_parts["session_options"]
