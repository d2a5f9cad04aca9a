"""Which CUDA GPU this machine has, asked without torch (cuda-python, else libcudart by ctypes).

Bundle checks, `inspect` and the TensorRT build use it to say which GPU a bundle needs and which
one is here. No GPU (or no CUDA runtime library) is an answer, not an error.
"""
from __future__ import annotations

import ctypes
from typing import Any

# cudaDeviceAttr values (CUDA runtime API): compute capability major / minor.
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76


def gpu_info(device: int = 0) -> dict[str, str] | None:
    """Name and compute capability ("8.9") of CUDA device `device`, or None without one."""
    info = _from_cuda_python(device)
    return info if info is not None else _from_libcudart(device)


def sm_name(compute_capability: str) -> str:
    """"8.9" -> "sm89", "12.0" -> "sm120"."""
    major, minor = compute_capability.split(".")
    return f"sm{major}{minor}"


def _from_cuda_python(device: int) -> dict[str, str] | None:
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        return None
    err, prop = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}


def _from_libcudart(device: int) -> dict[str, str] | None:
    try:
        from .cuda_memory import load_libcudart

        lib: Any = load_libcudart()
    except (OSError, RuntimeError):
        return None
    count, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value <= device:
        return None
    if (lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device) != 0
            or lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device) != 0):
        return None
    return {"name": f"CUDA device {device}", "compute_capability": f"{major.value}.{minor.value}"}
