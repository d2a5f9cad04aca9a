"""The two TensorRT flavours this project builds and runs: full TensorRT and TensorRT for RTX.

They share the Python API the build and the runner use (Builder, OnnxParser, Runtime, engine
and context calls); where they differ, the difference is named here and nowhere else:

- package: `tensorrt` (NVIDIA's index) vs `tensorrt_rtx_bindings` (PyPI:
  tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings);
- targets: full TensorRT builds for the GPU it runs on (or, with a hardware-compatibility level,
  for Ampere and newer); TensorRT-RTX compiles ahead of time, with no GPU, for the compute
  capabilities set on the builder config (`num_compute_capabilities`,
  `set_compute_capability`), and JIT-compiles its kernels when the engine first runs;
- typing: TensorRT-RTX and TensorRT 11 networks are always strongly typed; TensorRT 10 takes
  precision builder flags;
- plugins: only full TensorRT has the `tensorrt.plugin` decorator module the SpecVerify plugin
  is written with;
- the timing cache: TensorRT-RTX accepts it and ignores it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..base import BackendUnavailable


@dataclass(frozen=True)
class TensorRTFlavour:
    backend: str  # the manifest's and the profile's `backend`
    module: str  # the Python package to import
    title: str
    install_hint: str
    aot_targets: tuple[str, ...] | None  # what the builder compiles for without a GPU; None: the GPU here
    has_plugin_api: bool
    has_timing_cache: bool

    def import_module(self) -> Any:
        """The bindings, or BackendUnavailable naming the package to install."""
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise BackendUnavailable(f"{self.title} is not installed here ({exc}): "
                                     f"{self.install_hint}") from exc

    def version(self) -> str | None:
        try:
            return self.import_module().__version__
        except BackendUnavailable:
            return None

    def strongly_typed(self, trt: Any) -> bool:
        return self.aot_targets is not None or int(trt.__version__.split(".")[0]) >= 11


FULL = TensorRTFlavour(
    backend="tensorrt", module="tensorrt", title="TensorRT",
    install_hint=("pip install 'dspark-export[tensorrt]' --extra-index-url "
                  "https://pypi.nvidia.com (TensorRT's Python bindings and cuda-python, on a "
                  "machine with an NVIDIA GPU)"),
    aot_targets=None, has_plugin_api=True, has_timing_cache=True)

RTX = TensorRTFlavour(
    backend="tensorrt-rtx", module="tensorrt_rtx_bindings", title="TensorRT-RTX",
    install_hint="pip install 'dspark-export[tensorrt-rtx]' (the PyPI wheels "
                 "tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings)",
    aot_targets=("sm75", "sm80", "sm86", "sm89", "sm120", "sm121"),
    has_plugin_api=False, has_timing_cache=False)

FLAVOURS = {f.backend: f for f in (FULL, RTX)}
# GPUs a user may know a compute capability by, for messages.
GPU_EXAMPLES = {
    "sm75": "Turing: T4, RTX 20xx", "sm80": "Ampere: A100, A30", "sm86": "Ampere: RTX 30xx, A10, A40",
    "sm87": "Jetson Orin", "sm89": "Ada: RTX 40xx, L4, L40S", "sm90": "Hopper: H100, H200",
    "sm100": "Blackwell: B200", "sm120": "Blackwell: RTX 50xx, RTX PRO 6000",
    "sm121": "Blackwell: DGX Spark (GB10)",
}


def describe_targets(targets: list[str] | tuple[str, ...]) -> str:
    """`sm89 (Ada: RTX 40xx, L4, L40S)`, joined with ' or '."""
    return " or ".join(f"{t} ({GPU_EXAMPLES[t]})" if t in GPU_EXAMPLES else t for t in targets)
