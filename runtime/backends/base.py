"""The one interface every backend implements (Polygraphy's runner idea, kept small).

A runner owns one compiled graph: an ONNX Runtime session or a TensorRT engine. The draft/verify
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
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from ..kv import Memory


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
