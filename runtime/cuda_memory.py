"""Device memory for the GPU backends, through the CUDA runtime library and ctypes.

No Python dependency beyond numpy: libcudart comes with onnxruntime-gpu's and TensorRT's CUDA
wheels (or a CUDA toolkit). What lives here:

- `DeviceArray`: a device tensor (or a row range of one) that the loop passes between graphs.
- `CudaMemory`: where the KV caches live and how a step commits into them (strided
  device-to-device copies), the device counterpart of `kv.HostMemory`. Its buffers come from
  `allocate`: plain cudaMalloc here (TensorRT), an ONNX Runtime OrtValue in the ORT backend.
- `DeviceAllocation` (cudaMalloc, freed by cudaFree when its last user drops it) and
  `DevicePool`, a caching allocator for per-run graph outputs, so that a decode step does not
  call cudaMalloc/cudaFree for each of its outputs.
- `_CudaRuntime`: the few runtime calls all of this needs, and the process's one stream for
  TensorRT work.

Ordering: every copy here is issued on the legacy default stream (stream 0), which waits for
all earlier work on blocking streams (cudaStreamCreate makes blocking streams) and makes later
work on them wait for it. The TensorRT backend enqueues on one shared blocking stream, so
its graph runs, these copies and the reuse of pooled blocks are ordered without explicit
events; `synchronize()` after a commit makes it visible to the host as well.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_ALLOCATION = 256  # TensorRT wants a valid, 256-byte aligned address even for empty tensors
ALIGNMENT = 256  # what IExecutionContext.set_tensor_address documents (cudaMalloc gives >= 256)

_ERROR_MEMORY_ALLOCATION = 2


@dataclass(frozen=True)
class DeviceArray:
    """A contiguous device tensor or a row range of one; `owner` keeps the memory alive."""

    owner: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, lo: int, hi: int) -> DeviceArray:
        return DeviceArray(self.owner, self.ptr + lo * self.row_bytes, (hi - lo, *self.shape[1:]),
                           self.dtype)


class DeviceAllocation:
    """`nbytes` of device memory at `ptr`; `release` (cudaFree, or back to a pool) runs once,
    when the last reference goes or at `free()`. Not at interpreter exit: the driver reclaims
    everything then, and the CUDA runtime may already be gone."""

    def __init__(self, ptr: int, nbytes: int, release: Callable[[int], None]) -> None:
        self.ptr, self.nbytes = ptr, nbytes
        self._finalizer = weakref.finalize(self, release, ptr)
        self._finalizer.atexit = False

    @classmethod
    def malloc(cls, nbytes: int) -> DeviceAllocation:
        """Exactly sized (at least MIN_ALLOCATION bytes) cudaMalloc memory, uninitialised."""
        cudart = _cudart()
        return cls(cudart.malloc(max(int(nbytes), MIN_ALLOCATION)), int(nbytes), cudart.free_quietly)

    def free(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


def device_array(shape: tuple[int, ...], dtype: np.dtype,
                 allocation: DeviceAllocation | None = None) -> DeviceArray:
    """A DeviceArray over `allocation` (default: a new exact cudaMalloc), uninitialised."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    allocation = allocation or DeviceAllocation.malloc(nbytes)
    if allocation.nbytes < nbytes:
        raise ValueError(f"{allocation.nbytes} bytes cannot hold {shape} {dtype}")
    return DeviceArray(allocation, allocation.ptr, shape, dtype)


class DevicePool:
    """A caching allocator for short-lived buffers (per-run graph outputs).

    Sizes round up to powers of two (at least MIN_ALLOCATION bytes), so a decode loop whose
    shapes vary a little from step to step reuses a handful of blocks. A block returns to the
    pool when its last `DeviceArray` is dropped; it may still be read by work already enqueued,
    which is safe because every later writer is ordered after that work (module docstring).
    Blocks are never handed back to CUDA except by `release()`, or when an allocation fails.
    """

    def __init__(self, cudart: _CudaRuntime) -> None:
        self.cudart = cudart
        self.free_blocks: dict[int, list[int]] = {}
        self.mallocs = 0  # cudaMalloc calls made (for tests and diagnostics)

    @staticmethod
    def block_size(nbytes: int) -> int:
        return max(MIN_ALLOCATION, 1 << max(int(nbytes) - 1, 0).bit_length())

    def allocate(self, nbytes: int) -> DeviceAllocation:
        size = self.block_size(nbytes)
        blocks = self.free_blocks.get(size)
        if blocks:
            ptr = blocks.pop()
        else:
            ptr = self._malloc(size)
        return DeviceAllocation(ptr, size, lambda p, size=size: self._give_back(p, size))

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return device_array(shape, dtype, self.allocate(nbytes))

    @property
    def cached_bytes(self) -> int:
        return sum(size * len(blocks) for size, blocks in self.free_blocks.items())

    def release(self) -> None:
        """cudaFree every cached block (blocks in use stay valid and return here later)."""
        blocks, self.free_blocks = self.free_blocks, {}
        for ptrs in blocks.values():
            for ptr in ptrs:
                self.cudart.free_quietly(ptr)

    def _give_back(self, ptr: int, size: int) -> None:
        self.free_blocks.setdefault(size, []).append(ptr)

    def _malloc(self, size: int) -> int:
        self.mallocs += 1
        try:
            return self.cudart.malloc(size)
        except MemoryError:
            if not self.free_blocks:
                raise
        self.release()  # out of memory with blocks cached: hand them back and try once more
        return self.cudart.malloc(size)


class CudaMemory:
    """Device cache buffers; commits are strided device-to-device copies."""

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        """An uninitialised buffer: an exact cudaMalloc, freed when the last view is dropped."""
        return device_array(shape, dtype)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceArray:
        """Zero-filled: masked cache slots are still multiplied by 0, and 0 * NaN is NaN."""
        array = self.allocate(shape, dtype)
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

    def resized(self, buffer: DeviceArray, length: int) -> DeviceArray:
        """A zero-filled [B, H, length, D] buffer with buffer's first positions: one 2D copy,
        B*H blocks of min(S, length)*D elements from pitch S*D to pitch length*D."""
        batch, heads, positions, head_dim = buffer.shape
        out = self.empty((batch, heads, length, head_dim), buffer.dtype)
        row = head_dim * buffer.dtype.itemsize
        keep = min(positions, length)
        if keep and batch * heads:
            cudart = _cudart()
            cudart.check(cudart.lib.cudaMemcpy2DAsync(
                ctypes.c_void_p(out.ptr), length * row, ctypes.c_void_p(buffer.ptr),
                positions * row, keep * row, batch * heads, 3, None))
        return out

    def copy_prefix(self, buffer: DeviceArray, src: int, dst: int, n: int) -> None:
        """buffer[dst, :, :n] = buffer[src, :, :n]: H blocks of n*D elements, pitch S*D."""
        _, heads, positions, head_dim = buffer.shape
        row = head_dim * buffer.dtype.itemsize
        if n:
            stride = heads * positions * row
            cudart = _cudart()
            cudart.check(cudart.lib.cudaMemcpy2DAsync(
                ctypes.c_void_p(buffer.ptr + dst * stride), positions * row,
                ctypes.c_void_p(buffer.ptr + src * stride), positions * row, n * row, heads,
                3, None))

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

    def reshape(self, array: DeviceArray, shape: tuple[int, ...]) -> DeviceArray:
        if int(np.prod(shape, dtype=np.int64)) != int(np.prod(array.shape, dtype=np.int64)):
            raise ValueError(f"cannot view a device array of shape {array.shape} as {shape}")
        return DeviceArray(array.owner, array.ptr, tuple(shape), array.dtype)

    @staticmethod
    def synchronize() -> None:
        """Wait for the copies before the next graph reads them (ORT runs on its own stream)."""
        _cudart().check(_cudart().lib.cudaDeviceSynchronize())


class _CudaRuntime:
    """The few CUDA runtime calls the device path needs, through ctypes.

    `lib` is libcudart, or (in tests) any object with the same functions.
    """

    def __init__(self, lib: Any = None) -> None:
        self._stream: int | None = None
        self._pool: DevicePool | None = None
        if lib is not None:
            self.lib = lib
            return
        self.lib = self._load()
        self.lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                               ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                                               ctypes.c_int, ctypes.c_void_p]
        self.lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_int, ctypes.c_void_p]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]

    @staticmethod
    def _load() -> ctypes.CDLL:
        return load_libcudart()

    def check(self, status: int) -> None:
        if status != 0:
            message = self.lib.cudaGetErrorString(status).decode()
            raise RuntimeError(f"CUDA error {status}: {message}")

    # --- the TensorRT backend's needs ------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        status = self.lib.cudaMalloc(ctypes.byref(ptr), nbytes)
        if status == _ERROR_MEMORY_ALLOCATION:
            self.lib.cudaGetLastError()  # not sticky: clear it so later calls do not see it
            raise MemoryError(f"CUDA out of memory allocating {nbytes} bytes")
        self.check(status)
        return int(ptr.value)

    def free_quietly(self, ptr: int) -> None:
        """cudaFree from a finalizer: never raises (the context may be going away)."""
        try:
            self.lib.cudaFree(ctypes.c_void_p(ptr))
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            pass

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int | None) -> None:
        """cudaMemcpyAsync on `stream` (1 host->device, 2 device->host, 3 device->device)."""
        if nbytes:
            self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                                nbytes, kind, ctypes.c_void_p(stream)))

    def stream(self) -> int:
        """The process's one (blocking) stream for TensorRT work, created on first use."""
        if self._stream is None:
            handle = ctypes.c_void_p()
            self.check(self.lib.cudaStreamCreate(ctypes.byref(handle)))
            self._stream = int(handle.value or 0)
        return self._stream

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)))

    @property
    def pool(self) -> DevicePool:
        if self._pool is None:
            self._pool = DevicePool(self)
        return self._pool


def load_libcudart() -> ctypes.CDLL:
    """libcudart from the nvidia-* wheels or the system; RuntimeError naming what to install."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for site in sys.path:  # the nvidia-* wheels (nvidia/cu13/lib, nvidia/cuda_runtime/lib)
        names += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*")))
    for name in names:
        try:
            return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise RuntimeError("the CUDA path needs the CUDA runtime library (libcudart): install "
                       "the GPU extra of the backend ('dspark-export[gpu]' for onnxruntime-gpu, "
                       "'dspark-export[tensorrt]' for TensorRT) with its CUDA wheels "
                       "(nvidia-cuda-runtime), or a CUDA toolkit")


_CUDART: _CudaRuntime | None = None


def _cudart() -> _CudaRuntime:
    global _CUDART
    if _CUDART is None:
        _CUDART = _CudaRuntime()
    return _CUDART
