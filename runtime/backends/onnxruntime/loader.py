"""ONNX Runtime loader: checks a bundle's providers here, loads one session per graph, and
times the target with its caches on the device for SPS(B) when the CUDA provider runs it."""
from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ..base import Backend, Platform, Runner
from .runner import (CPU_PROVIDER, CUDA_PROVIDER, SPINNING_GRAPHS, OnnxRuntimeRunner,
                     default_providers, device_array, session_options)

if TYPE_CHECKING:
    from ...bundle import Bundle


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    title = "ONNX Runtime"

    def probe(self) -> Platform:
        return Platform(None, None, None, tuple(ort.get_available_providers()))

    def problems(self, manifest: dict[str, Any], platform: Platform) -> list[str]:
        here = platform.onnxruntime_providers
        if here is None:
            return ["onnxruntime is not installed (pip install onnxruntime)"]
        wanted = (manifest.get("session_options") or {}).get("providers") or [CPU_PROVIDER]
        if not set(wanted) & set(here):
            return [f"none of the execution providers {wanted} is available here "
                    f"(available: {list(here)})"]
        return []

    def load_runners(self, bundle: Bundle, device: str = "auto",
                     threads: int | None = None) -> dict[str, Runner]:
        """`threads` overrides the manifest's intra-op thread count."""
        options = dict(bundle.session_options,
                       **({"intra_op_num_threads": threads} if threads else {}))
        providers = default_providers(device, options.get("providers"))
        return {name: OnnxRuntimeRunner(file, providers=providers,
                                        session_options=session_options(
                                            options, spinning=name in SPINNING_GRAPHS))
                for name, file in bundle.graphs.items()}

    def timing_runner(self, bundle_root: Any, manifest_section: dict[str, Any]
                      ) -> tuple[Runner, str]:
        """`manifest_section`: the session options the build recorded."""
        available = ort.get_available_providers()
        wanted = manifest_section["providers"]
        missing = [p for p in wanted if p not in available]
        providers: list[Any] = [p for p in wanted if p in available]
        if CUDA_PROVIDER in providers:  # same provider options as the runtime (TF32 off)
            providers = default_providers("cuda", wanted)
        runner = OnnxRuntimeRunner(Path(bundle_root) / "target.onnx", providers=providers or None,
                                   session_options=session_options(manifest_section))
        if runner.on_device:
            from ...gpu import gpu_info

            gpu = gpu_info()
            return DeviceTimedRunner(runner), gpu["name"] if gpu else CUDA_PROVIDER
        device = f"CPU ({platform.machine()}, {os.cpu_count()} threads)"
        if missing:
            device += f"; {', '.join(missing)} not available at build time"
            warnings.warn(f"{', '.join(missing)} is not offered by this onnxruntime "
                          f"({', '.join(available)}); the graphs are portable, but SPS(B) was "
                          "measured on the CPU provider (recorded in sps_table.json); rebuild "
                          "on the target machine for a hardware-aware schedule", stacklevel=2)
        return runner, device

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": ort.__version__}


class DeviceTimedRunner:
    """A CUDA-provider runner whose SPS timing keeps inputs and outputs on the GPU
    (`time_infer`): the runtime binds device-resident KV caches through IOBinding, so
    host<->device copies of the caches are not a step's cost."""

    _WARMUP = 2

    def __init__(self, runner: OnnxRuntimeRunner) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def infer(self, feeds: Any) -> dict[str, Any]:
        return self.runner.infer(feeds)

    def time_infer(self, feeds: dict[str, Any], repeats: int) -> list[float]:
        # Inputs uploaded once (the OrtValues own the device memory while they are bound).
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0)
                  for v in feeds.values()]
        device_feeds = {k: device_array(v) for k, v in zip(feeds, values)}
        outputs = set(self.runner.output_names)
        for _ in range(self._WARMUP):
            self.runner.run(device_feeds, device_outputs=outputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.runner.run(device_feeds, device_outputs=outputs)  # synchronises its outputs
            times.append(time.perf_counter() - start)
        del values
        return times

    def close(self) -> None:
        self.runner.close()
