"""TensorRT backend: one engine, one execution context, device buffers through cuda-python.

tensorrt and cuda-python are imported lazily, so `dspark_runtime` imports on machines without
them. An engine may hold several optimization profiles (prefill and verify); each call picks
the tightest one whose ranges hold the feed shapes, since kernels are tuned for its shapes.
Device buffers grow to the largest shape seen and are reused, so a steady decode loop does
not allocate. bf16 tensors travel as float32 on the host (numpy has no bfloat16).
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Runner

if TYPE_CHECKING:
    from ..bundle import Bundle

_MIN_ALLOC = 256  # TensorRT wants a valid address even for an empty tensor


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def gpu_info(device: int = 0) -> dict[str, str] | None:
    """Name and compute capability ("9.0") of a CUDA device, or None without one."""
    try:
        cudart = _cudart()
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count <= device:
        return None
    prop = _check(cudart, cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}


class TensorRTRunner(Runner):
    """Runs one serialized engine on host arrays (the `Runner` interface)."""

    def __init__(self, engine_path: str | Path, *, plugins: Sequence[Mapping[str, Any]] = (),
                 allow_host_code: bool = False) -> None:
        """`plugins`: the manifest's plugin entries; those without an embedded (AOT) kernel are
        registered first. `allow_host_code`: for version-compatible engines, which embed
        TensorRT's lean runtime; only for bundles whose hashes were verified."""
        import tensorrt as trt

        self._trt = trt
        path = Path(engine_path)
        self.name = path.stem
        for plugin in plugins:
            if not plugin.get("aot"):
                module, func = plugin["register"].split(":")
                getattr(importlib.import_module(module), func)()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = allow_host_code
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine (built for "
                               "another TensorRT version or GPU? see the log above)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: self._engine.get_tensor_dtype(n) for n in names}
        self._ranges = [
            {n: [tuple(s) for s in self._engine.get_tensor_profile_shape(n, k)]
             for n in self.input_names}
            for k in range(self._engine.num_optimization_profiles)]
        self._cuda = _cudart()
        self._stream = _check(self._cuda, self._cuda.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._profile = 0

    @classmethod
    def from_bundle(cls, bundle: Bundle, name: str) -> TensorRTRunner:
        """The runner for graph `name` of a loaded TensorRT bundle, with its plugins."""
        info = bundle.manifest["tensorrt"]
        plugins = [p for p in info.get("plugins", []) if p.get("graph") == name]
        return cls(bundle.graphs[name], plugins=plugins,
                   allow_host_code=bool(info.get("version_compatible")))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._bind(feeds)
        self._execute()
        cuda = self._cuda
        d2h = cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n, host in outputs.items():
            if host.nbytes:
                _check(cuda, cuda.cudaMemcpyAsync(host.ctypes.data, self._buffers[n][0],
                                                  host.nbytes, d2h, self._stream))
        _check(cuda, cuda.cudaStreamSynchronize(self._stream))
        return {n: self._from_engine(n, host) for n, host in outputs.items()}

    def time_infer(self, feeds: Mapping[str, np.ndarray], repeats: int) -> list[float]:
        """Seconds per execution with the inputs already on the GPU, after one warm-up run.

        The runtime keeps its caches on the device, so SPS profiling must not time the
        host-to-device copy of every KV buffer that `infer` makes.
        """
        self._bind(feeds)
        self._execute()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._execute()
            times.append(time.perf_counter() - start)
        return times

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pick the profile, set shapes, upload inputs; returns empty host outputs."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        hosts = {n: self._to_engine(n, feeds[n]) for n in self.input_names}
        profile = self.select_profile({n: a.shape for n, a in hosts.items()})
        cuda, ctx = self._cuda, self._context
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, self._stream):
                raise RuntimeError(f"{self.name}: could not switch to optimization profile "
                                   f"{profile}")
            self._profile = profile
        h2d = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
        for n, host in hosts.items():
            if not ctx.set_input_shape(n, host.shape):
                raise ValueError(f"{self.name}: shape {host.shape} rejected for input '{n}'")
            ptr = self._buffer(n, host.nbytes)
            if host.nbytes:
                _check(cuda, cuda.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d,
                                                  self._stream))
            ctx.set_tensor_address(n, ptr)
        outputs = {}
        for n in self.output_names:
            shape = tuple(ctx.get_tensor_shape(n))
            outputs[n] = np.empty(shape, dtype=self._host_dtype(n))
            ctx.set_tensor_address(n, self._buffer(n, outputs[n].nbytes))
        return outputs

    def _execute(self) -> None:
        """Run the engine on the bound buffers and wait for it."""
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see the log above)")
        _check(self._cuda, self._cuda.cudaStreamSynchronize(self._stream))

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The tightest optimization profile whose min..max ranges hold every input shape."""
        fitting = []
        for k, ranges in enumerate(self._ranges):
            if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in
                                                     zip(lo, shapes[n], hi))
                   for n, (lo, _, hi) in ranges.items()):
                fitting.append((sum(int(np.prod(hi)) for _, _, hi in ranges.values()), k))
        if not fitting:
            raise ValueError(f"{self.name}: input shapes {dict(shapes)} lie outside every "
                             "optimization profile of the engine (see the bundle's profile "
                             "limits: max_batch, max_context, prefill tokens)")
        return min(fitting)[1]

    def close(self) -> None:
        if getattr(self, "_cuda", None) is None:
            return
        for ptr, _ in self._buffers.values():
            self._cuda.cudaFree(ptr)
        self._buffers.clear()
        self._cuda.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._runtime = self._cuda = None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes > size or not ptr:
            if ptr:
                _check(self._cuda, self._cuda.cudaFree(ptr))
            size = max(nbytes, _MIN_ALLOC)
            ptr = int(_check(self._cuda, self._cuda.cudaMalloc(size)))
            self._buffers[name] = (ptr, size)
        return ptr

    def _host_dtype(self, name: str) -> np.dtype:
        dtype = self._dtypes[name]
        if dtype == self._trt.DataType.BF16:
            return np.dtype(np.uint16)
        return np.dtype(self._trt.nptype(dtype))

    def _to_engine(self, name: str, value: np.ndarray) -> np.ndarray:
        if self._dtypes[name] == self._trt.DataType.BF16:
            return float32_to_bf16_bits(value)
        return np.ascontiguousarray(value, dtype=self._host_dtype(name))

    def _from_engine(self, name: str, host: np.ndarray) -> np.ndarray:
        if self._dtypes[name] == self._trt.DataType.BF16:
            return bf16_bits_to_float32(host)
        return host


def float32_to_bf16_bits(value: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bfloat16, as the uint16 bit patterns TensorRT reads."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(value)
    if np.any(nan):
        out[nan] = np.uint16(0x7FC0)
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _cudart() -> Any:
    """cuda-python's runtime bindings (module path changed in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime
    return runtime


def _check(cudart: Any, result: tuple) -> Any:
    """cuda-python returns (error, *values): raise on error, else the value(s)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error: {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)
