"""ONNX Runtime backend: the CPU provider everywhere, the CUDA provider with onnxruntime-gpu.

CPU: numpy arrays go into `InferenceSession.run` as they are (ONNX Runtime reads contiguous
numpy memory in place, views of cache rows included), so the host-side cache is zero-copy.

CUDA: the extension of `Runner` the loop uses is `run(feeds, device_outputs=...)` plus
`memory` (where caches live) and `input_shapes` / `input_dtypes`. Feeds may be `DeviceArray`s
(bound in place through IOBinding), outputs named in `device_outputs` stay on the GPU as
`DeviceArray`s, the rest come back as numpy. Cache buffers are device allocations
(`CudaMemory`), and a commit is a strided device-to-device copy (cudaMemcpy2DAsync through
ctypes: no extra Python dependency), so a step moves no cache between host and device. TF32 is
off: it moves fp32 logits enough to change sampled tokens. This path needs onnxruntime-gpu and
a GPU and is chosen only where the CUDA provider is offered; CI cannot run it (its test skips).
It was run on an H200 with onnxruntime-gpu 1.31.1: the same tokens as the CPU path.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..kv import HostMemory
from .base import Runner

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

_ONNX_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


def numpy_dtype(onnx_type: str) -> np.dtype:
    """numpy dtype of an ONNX tensor type string (bf16 caches are not supported here)."""
    if onnx_type not in _ONNX_TYPES:
        raise TypeError(f"ONNX type {onnx_type} is not supported by the ONNX Runtime backend")
    return _ONNX_TYPES[onnx_type]


def cuda_available() -> bool:
    """True where onnxruntime-gpu is installed and lists the CUDA provider."""
    return CUDA_PROVIDER in ort.get_available_providers()


def default_providers(device: str = "auto", wanted: Sequence[str] | None = None) -> list[Any]:
    """Providers for `device` (auto, cpu or cuda); `auto` takes CUDA where the bundle allows it
    (`wanted`, from its manifest, or any) and onnxruntime-gpu offers it, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown ONNX Runtime device {device!r}; choose auto, cpu or cuda")
    allowed = wanted is None or CUDA_PROVIDER in wanted
    if device == "cpu" or (device == "auto" and not (allowed and cuda_available())):
        return [CPU_PROVIDER]
    if not cuda_available():
        raise RuntimeError("the CUDA provider needs onnxruntime-gpu (pip install "
                           "'dspark-export[gpu]') and a GPU; this onnxruntime offers "
                           f"{ort.get_available_providers()}")
    _preload_cuda_libraries()
    # TF32 matmuls move fp32 logits by ~1e-3: enough to flip sampled tokens against the reference.
    return [(CUDA_PROVIDER, {"use_tf32": "0"}), CPU_PROVIDER]


def session_options(settings: Mapping[str, Any]) -> ort.SessionOptions:
    """SessionOptions from a manifest's `session_options` (level and thread count)."""
    options = ort.SessionOptions()
    level = settings.get("graph_optimization_level")
    if level:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    threads = settings.get("intra_op_num_threads")
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels before a CUDA session is created (ORT >= 1.21)."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


class OnnxRuntimeRunner(Runner):
    """One ONNX graph in one InferenceSession."""

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options: ort.SessionOptions | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: graph file missing")
        self.name = path.stem
        self.session = ort.InferenceSession(str(path), sess_options=session_options,
                                            providers=list(providers or default_providers()))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: tuple(i.shape) for i in self.session.get_inputs()}
        self.input_dtypes = {i.name: numpy_dtype(i.type) for i in self.session.get_inputs()
                             if i.type in _ONNX_TYPES}
        self.on_device = self.session.get_providers()[0] == CUDA_PROVIDER
        self.memory = CudaMemory() if self.on_device else HostMemory()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def run(self, feeds: Mapping[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Run with host or device feeds; `device_outputs` stay where the graph ran."""
        if not self.on_device:
            return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, DeviceArray):
                binding.bind_input(name, "cuda", 0, value.dtype.type, list(value.shape), value.ptr)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in device_outputs else "cpu", 0)
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        values = binding.get_outputs()
        return {name: DeviceArray.wrap(v) if name in device_outputs else v.numpy()
                for name, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None


@dataclass(frozen=True)
class DeviceArray:
    """A contiguous device tensor or a row range of one; `owner` keeps the memory alive."""

    owner: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def wrap(cls, value: ort.OrtValue) -> DeviceArray:
        return cls(value, value.data_ptr(), tuple(value.shape()), numpy_dtype(value.data_type()))

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, lo: int, hi: int) -> DeviceArray:
        return DeviceArray(self.owner, self.ptr + lo * self.row_bytes, (hi - lo, *self.shape[1:]),
                           self.dtype)


class CudaMemory:
    """Device cache buffers; commits are strided device-to-device copies."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        """Zero-filled: masked cache slots are still multiplied by 0, and 0 * NaN is NaN."""
        array = DeviceArray.wrap(ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), np.dtype(dtype).type, "cuda", 0))
        nbytes = int(np.prod(shape, dtype=np.int64)) * array.dtype.itemsize
        if nbytes:
            _cudart().check(_cudart().lib.cudaMemset(ctypes.c_void_p(array.ptr), 0, nbytes))
        return array

    def rows(self, buffer: DeviceArray, lo: int, hi: int) -> DeviceArray:
        return buffer.rows(lo, hi)

    def commit(self, caches: list[DeviceArray], presents: list[DeviceArray],
               lengths: np.ndarray, counts: np.ndarray) -> None:
        """Per buffer and row: H blocks of counts[b] * D elements, pitch T*D to pitch S*D.

        That is one cudaMemcpy2DAsync per (layer, K/V, row): fine at small batch; a batched
        copy (cudaMemcpyBatchAsync, or one kernel) is the next step for large batches.
        """
        cudart = _cudart()
        rows = [(b, int(lengths[b]), int(counts[b])) for b in np.flatnonzero(counts).tolist()]
        for cache, present in zip(caches, presents):
            _, heads, capacity, head_dim = cache.shape
            row = head_dim * cache.dtype.itemsize
            steps = present.shape[2]
            for b, start, n in rows:
                dst = cache.ptr + (b * heads * capacity + start) * row
                src = present.ptr + b * heads * steps * row
                cudart.check(cudart.lib.cudaMemcpy2DAsync(
                    ctypes.c_void_p(dst), capacity * row, ctypes.c_void_p(src), steps * row,
                    n * row, heads, 3, None))

    def leading(self, array: DeviceArray, n: int) -> DeviceArray:
        """array[:, :n]: a view for one row or the full axis, else one strided device copy."""
        rows, full = array.shape[0], array.shape[1]
        if n == full or rows == 1:
            return DeviceArray(array.owner, array.ptr, (rows, n, *array.shape[2:]), array.dtype)
        out = self.empty((rows, n, *array.shape[2:]), array.dtype)
        inner = array.row_bytes // full
        cudart = _cudart()
        cudart.check(cudart.lib.cudaMemcpy2DAsync(ctypes.c_void_p(out.ptr), n * inner,
                                                  ctypes.c_void_p(array.ptr), full * inner,
                                                  n * inner, rows, 3, None))
        self.synchronize()
        return out

    @staticmethod
    def synchronize() -> None:
        """Wait for the copies before the next graph reads them (ORT runs on its own stream)."""
        _cudart().check(_cudart().lib.cudaDeviceSynchronize())


class _CudaRuntime:
    """The few CUDA runtime calls the commit path needs, through ctypes."""

    def __init__(self) -> None:
        self.lib = self._load()
        self.lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                               ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                               ctypes.c_int, ctypes.c_void_p]
        self.lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    @staticmethod
    def _load() -> ctypes.CDLL:
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        for site in sys.path:  # the nvidia-* wheels (nvidia/cu13/lib, nvidia/cuda_runtime/lib)
            names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*")))
        for name in names:
            try:
                return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
        raise RuntimeError("the CUDA path needs the CUDA runtime library (libcudart); "
                           "install onnxruntime-gpu with its CUDA wheels")

    def check(self, status: int) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode()
            raise RuntimeError(f"CUDA error {status}: {message}")


_CUDART: _CudaRuntime | None = None


def _cudart() -> _CudaRuntime:
    global _CUDART
    if _CUDART is None:
        _CUDART = _CudaRuntime()
    return _CUDART
