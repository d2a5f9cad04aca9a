"""The one interface every backend implements (Polygraphy's runner idea, kept small).

A runner owns one compiled graph: an ONNX Runtime session or a TensorRT engine. The pipeline
only ever calls `infer`, so the draft/verify loop is the same code on every backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np


class Runner(ABC):
    """Runs one graph of a bundle (`target`, `draft`, `markov` or `verify`)."""

    name: str
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays and return every output by name."""

    def close(self) -> None:
        """Release sessions, contexts and device memory (idempotent)."""
