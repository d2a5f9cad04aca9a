"""TensorRT loader (both flavours): checks a bundle's engines against this machine's bindings
and GPU, and loads one runner per engine. A bundle needs the flavour it was built with, a
version that can read its engines, and a GPU of one of the compute capabilities it targets."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...gpu import gpu_info, sm_name
from ..base import Backend, BackendUnavailable, Platform, Runner
from .flavours import FULL, RTX, TensorRTFlavour, describe_targets
from .runner import TensorRTRunner

if TYPE_CHECKING:
    from ...bundle import Bundle


class TensorRTBackend(Backend):
    def __init__(self, flavour: TensorRTFlavour) -> None:
        self.flavour = flavour
        self.name, self.title = flavour.backend, flavour.title

    def probe(self) -> Platform:
        gpu = gpu_info()
        return Platform(self.flavour.version(), gpu and gpu["name"],
                        gpu and gpu["compute_capability"], None)

    def problems(self, manifest: dict[str, Any], platform: Platform) -> list[str]:
        info = manifest.get("tensorrt") or {}
        problems = self._version_problems(info, platform.tensorrt_version)
        targets = engine_targets(info)
        needs = describe_targets(targets) if targets else "the GPU it was built on"
        here, name = platform.compute_capability, platform.gpu_name
        if here is None:
            problems.append(f"no CUDA GPU is visible here: the engines need an NVIDIA GPU of "
                            f"compute capability {needs}")
        elif info.get("hardware_compatibility") == "ampere_plus":
            if _version_key(here) < (8, 0):
                problems.append(f"the engines need an Ampere or newer GPU (compute capability "
                                f"8.0+), this GPU ({name}) is {here}")
        elif targets and sm_name(here) not in targets:
            problems.append(f"the engines were built for {needs}; this GPU ({name}) is "
                            f"{sm_name(here)}")
        return problems

    def _version_problems(self, info: dict[str, Any], here: str | None) -> list[str]:
        built = info.get("version")
        if here is None:
            return [f"{self.title} is not installed (the engines need {self.title} {built}): "
                    f"{self.flavour.install_hint}"]
        if info.get("version_compatible"):
            if _version_key(here) < _version_key(built):
                return [f"the engines are version-compatible from {self.title} {built} on, "
                        f"but this machine has {self.title} {here}"]
        elif here != built:
            return [f"the engines were built with {self.title} {built}, this machine has "
                    f"{self.title} {here} (rebuild the bundle, or build with "
                    "version_compatible: true)"]
        return []

    def load_runners(self, bundle: Bundle, device: str = "auto",
                     threads: int | None = None) -> dict[str, Runner]:
        if device == "cpu":
            raise BackendUnavailable(f"this is a {self.title} bundle: it runs on an NVIDIA GPU "
                                     "only (backend 'cpu' needs an ONNX Runtime bundle, e.g. "
                                     "`dspark-export build --profile cpu`)")
        if device not in ("auto", "cuda"):
            raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
        self.flavour.import_module()
        runners: dict[str, Runner] = {}
        try:
            for name in bundle.graphs:
                runners[name] = TensorRTRunner.from_bundle(bundle, name, flavour=self.flavour)
        except BaseException:
            for runner in runners.values():
                runner.close()
            raise
        return runners

    def timing_runner(self, bundle_root: Any, manifest_section: dict[str, Any]
                      ) -> tuple[Runner, str]:
        gpu = gpu_info()
        if gpu is None:
            raise BackendUnavailable(f"timing {self.title} engines needs a CUDA GPU")
        runner = TensorRTRunner(Path(bundle_root) / "target.engine", flavour=self.flavour)
        return runner, gpu["name"]

    def versions(self) -> dict[str, str]:
        version = self.flavour.version()
        return {self.flavour.module: version} if version else {}


def engine_targets(info: dict[str, Any]) -> list[str]:
    """The compute capabilities (`sm89`) a manifest's tensorrt section says its engines run on;
    bundles from before multi-target builds record one `compute_capability` ("9.0")."""
    if info.get("compute_capabilities"):
        return list(info["compute_capabilities"])
    cc = info.get("compute_capability")
    return [sm_name(cc)] if cc else []


def _version_key(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in (version or "").split(".") if p.isdigit())


def full_tensorrt() -> TensorRTBackend:
    return TensorRTBackend(FULL)


def tensorrt_rtx() -> TensorRTBackend:
    return TensorRTBackend(RTX)
