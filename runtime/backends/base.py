"""The two interfaces every backend implements (Polygraphy's loader/runner split, kept small).

A `Backend` (one per folder under backends/, found through the registry in backends/__init__.py)
says whether this machine can run a bundle it built, loads the bundle's runners, and gives the
build a runner to time SPS(B) with. A runner owns one compiled graph: an ONNX Runtime session or a TensorRT engine. The draft/verify
loop (pipeline.py) only uses what is declared here, so it is the same code on every backend:

- `run(feeds, device_outputs)`: feeds are numpy arrays or, on a GPU backend, `DeviceArray`s
  (backends/cuda.py) that the runner binds in place; outputs named in `device_outputs` come
  back as whatever the runner's `memory` holds (numpy on the host backends, `DeviceArray`s on
  the GPU ones), every other output as numpy, ready to read.
- `memory`: where KV caches for this graph live and how a step commits into them
  (`kv.HostMemory` or `cuda.CudaMemory`); the loop allocates caches through it.
- `input_shapes` / `input_dtypes`: per input, the graph's shape (a dynamic axis is a name or
  -1) and the numpy dtype of its storage (bfloat16 tensors are stored as uint16 bit patterns:
  numpy has no bfloat16).
- `infer(feeds)`: host arrays in, every output as numpy: the convenience for tools and tests.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..kv import Memory

if TYPE_CHECKING:
    from ..bundle import Bundle


class Runner(ABC):
    """Runs one graph of a bundle (`target`, `draft`, `markov` or `verify`)."""

    name: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple[int | str | None, ...]]
    input_dtypes: dict[str, np.dtype]
    memory: Memory

    @abstractmethod
    def run(self, feeds: Mapping[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Run the graph and return every output by name.

        Outputs in `device_outputs` stay in `memory` (valid until the caller drops them, across
        later runs); the others are numpy arrays whose values are final when this returns.
        Device inputs and outputs may still be in use by work queued on the device when this
        returns: every consumer this package has (the next run of any runner of the same
        pipeline, a `memory` commit) is ordered after it.
        """

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays and return every output as numpy."""
        return self.run(feeds)

    def close(self) -> None:
        """Release sessions, contexts and device memory (idempotent)."""


class BackendUnavailable(RuntimeError):
    """What a bundle's backend needs (a package, a GPU) is missing here; the message names it."""


@dataclass(frozen=True)
class Platform:
    """What this machine offers, as far as a bundle's compatibility is concerned."""

    tensorrt_version: str | None  # of the bundle's TensorRT flavour
    gpu_name: str | None
    compute_capability: str | None  # "9.0"
    onnxruntime_providers: tuple[str, ...] | None


class Backend(ABC):
    """One backend's loader: checks a bundle against this machine and loads its runners."""

    name: str  # the manifest's `backend` value
    title: str  # how messages name it

    @abstractmethod
    def probe(self) -> Platform:
        """Look at this machine (the backend's package, the GPU), importing nothing else."""

    @abstractmethod
    def problems(self, manifest: dict[str, Any], platform: Platform) -> list[str]:
        """Why `platform` cannot run a bundle with this manifest (empty when it can)."""

    @abstractmethod
    def load_runners(self, bundle: Bundle, device: str = "auto",
                     threads: int | None = None) -> dict[str, Runner]:
        """One runner per graph of a loaded, checked bundle. `device`: auto, cpu or cuda."""

    @abstractmethod
    def timing_runner(self, bundle_root: Any, manifest_section: dict[str, Any]
                      ) -> tuple[Runner, str]:
        """A runner over the target graph that times what the runtime runs (device-resident
        caches), and the name of the device it runs on: for SPS(B) profiling at build time."""

    def versions(self) -> dict[str, str]:
        """Versions of the backend's packages here, for the manifest's `tools`."""
        return {}
