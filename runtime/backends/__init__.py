"""The backend registry: the one place that maps a bundle's `backend` to the code that runs it.

The pipeline, the bundle check, `inspect` and `build` all look a backend up here by the name a
manifest or a profile carries. Entries are dotted paths imported on first use, so looking up
the ONNX Runtime backend never imports TensorRT (and nothing here imports torch).
"""
from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from .base import Backend, BackendUnavailable, Platform, Runner

# manifest `backend` -> ("module:factory" of its `Backend`, "module:factory" of its builder).
# Builders live in the toolchain (dspark_export.build, which needs torch and onnx): only
# `build` imports them, so this runtime package names them without importing them.
_REGISTRY = {
    "onnxruntime": ("dspark_runtime.backends.onnxruntime:OnnxRuntimeBackend",
                    "dspark_export.build.onnxruntime_build:OnnxRuntimeBuilder"),
    "tensorrt": ("dspark_runtime.backends.tensorrt:full_tensorrt",
                 "dspark_export.build.tensorrt_build:full_tensorrt_builder"),
    "tensorrt-rtx": ("dspark_runtime.backends.tensorrt:tensorrt_rtx",
                     "dspark_export.build.tensorrt_build:tensorrt_rtx_builder"),
}

__all__ = ["Backend", "BackendUnavailable", "Platform", "Runner", "backend_names",
           "get_backend", "get_builder"]


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


@cache
def get_backend(name: str) -> Backend:
    """The backend a manifest or profile names; an unknown name lists the known ones."""
    return _load(name, 0)


@cache
def get_builder(name: str) -> Any:
    """The toolchain's builder for backend `name` (see dspark_export.build.pipeline)."""
    return _load(name, 1)


def _load(name: str, which: int) -> Any:
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(_REGISTRY)})")
    module, factory = _REGISTRY[name][which].split(":")
    return getattr(importlib.import_module(module), factory)()
