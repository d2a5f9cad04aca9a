"""TensorRT runner (both flavours): one engine and one execution context per graph, on device memory.

The bindings are imported when a runner is made, so `dspark_runtime` imports on machines
without them. The runner implements the whole `Runner` interface (base.py), so the draft/verify loop runs on TensorRT
exactly as on ONNX Runtime's CUDA path:

- Feeds: a `DeviceArray` (a KV cache view, a previous graph's output) is bound in place with
  `set_tensor_address`; a numpy feed is uploaded into a per-input device buffer that grows to
  the largest size seen. TensorRT requires 256-byte aligned addresses: a device feed that is
  not aligned (a row window of a buffer whose rows are not multiples of 256 bytes) is copied,
  device to device, into an aligned buffer first (`realigned` counts those copies).
- Outputs: those named in `device_outputs` get fresh blocks from the caching `DevicePool` and
  come back as `DeviceArray`s that stay valid as long as the caller holds them; the others go
  to per-output device buffers and are copied back to numpy.
- Profiles: an engine may hold several optimization profiles (prefill and verify); each call
  picks the tightest one whose ranges hold the feed shapes, since kernels are tuned for them.
- Streams: all TensorRT runners of the process enqueue on one shared stream (cuda.py), so a
  graph that reads another's device output runs after it without a host round trip. `run`
  synchronizes only when it copies outputs to the host (the loop reads those at once); cache
  commits (`CudaMemory`, legacy default stream, then a device synchronize) are ordered after
  the run that produced the new K/V.
- `memory` is `CudaMemory` with cudaMalloc'd buffers (cuda.py); `input_shapes` come from the
  engine (-1 for a dynamic axis); bf16 tensors are stored as uint16 bit patterns on the device
  and in `input_dtypes`, and travel as float32 on the host (numpy has no bfloat16).

Written against TensorRT 10/11's documented Python API, which TensorRT-RTX shares; without a
GPU no engine can be deserialized, so CI tests the runner's calls against a clearly labelled
fake bindings module (tests/fakes/) and its real test skips there.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...cuda_memory import ALIGNMENT, CudaMemory, DeviceAllocation, DeviceArray
from ...cuda_memory import _cudart as _cuda_runtime
from ..base import BackendUnavailable, Runner
from .flavours import FULL, TensorRTFlavour

if TYPE_CHECKING:
    from ...bundle import Bundle

_H2D, _D2H, _D2D = 1, 2, 3


class TensorRTRunner(Runner):
    """Runs one serialized engine (the `Runner` interface, host or device tensors)."""

    def __init__(self, engine_path: str | Path, *, flavour: TensorRTFlavour = FULL,
                 plugins: Sequence[Mapping[str, Any]] = (), allow_host_code: bool = False,
                 stream: int | None = None) -> None:
        """`plugins`: the manifest's plugin entries; those without an embedded (AOT) kernel are
        registered first. `allow_host_code`: for version-compatible engines, which embed
        TensorRT's lean runtime; only for bundles whose hashes were verified. `stream`: a CUDA
        stream handle (default: the process's shared TensorRT stream)."""
        trt = flavour.import_module()
        self._trt = trt
        path = Path(engine_path)
        self.name = path.stem
        for plugin in plugins:
            if not plugin.get("aot"):
                module, func = plugin["register"].split(":")
                try:
                    getattr(importlib.import_module(module), func)()
                except ImportError as exc:
                    raise BackendUnavailable(f"{path}: the engine needs the TensorRT plugin "
                                              f"{plugin.get('op', module)}, which could not be "
                                              f"registered: {exc}") from exc
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = allow_host_code
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{path}: {flavour.title} could not deserialize the engine (built "
                               "for another version or GPU? see the log above)")
        engine = self._engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"{path}: TensorRT could not create an execution context "
                               "(out of device memory? see the log above)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: engine.get_tensor_dtype(n) for n in names}
        self._storage = {n: _storage_dtype(trt, self._dtypes[n]) for n in names}
        self.input_shapes = {n: tuple(int(d) for d in engine.get_tensor_shape(n))
                             for n in self.input_names}
        self.input_dtypes = {n: self._storage[n] for n in self.input_names
                             if self._storage[n] is not None}
        self._host_inputs = {n for n in self.input_names
                             if engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        self._ranges = [
            {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, k)]
             for n in self.input_names if n not in self._host_inputs}
            for k in range(engine.num_optimization_profiles)]
        self._cuda = _cuda_runtime()
        self._stream = self._cuda.stream() if stream is None else int(stream)
        self.memory = CudaMemory()
        self._buffers: dict[str, DeviceAllocation] = {}  # grown per tensor, reused
        self._profile = 0
        self._in_flight = False  # enqueued work not yet synchronized by this runner
        self._keep_alive: list[np.ndarray] = []  # host-resident inputs of the last run
        self.realigned = 0  # device feeds copied to an aligned buffer (see the module doc)

    @classmethod
    def from_bundle(cls, bundle: Bundle, name: str, *, flavour: TensorRTFlavour = FULL,
                    stream: int | None = None) -> TensorRTRunner:
        """The runner for graph `name` of a loaded TensorRT bundle, with its plugins."""
        info = bundle.manifest["tensorrt"]
        plugins = [p for p in info.get("plugins", []) if p.get("graph") == name]
        return cls(bundle.graphs[name], flavour=flavour, plugins=plugins,
                   allow_host_code=bool(info.get("version_compatible")), stream=stream)

    def run(self, feeds: Mapping[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Run with host or device feeds; `device_outputs` stay on the GPU (base.Runner)."""
        outputs = self._bind(feeds, device_outputs)
        self._execute()
        results: dict[str, Any] = {}
        copied = []
        for n, (shape, out) in outputs.items():
            if isinstance(out, DeviceArray):
                results[n] = out
                continue
            host = np.empty(shape, dtype=self._storage[n])
            self._cuda.memcpy(host.ctypes.data, out, host.nbytes, _D2H, self._stream)
            copied.append((n, host))
        if copied:  # the loop reads these at once
            self.synchronize()
        for n, host in copied:
            results[n] = self._from_engine(n, host)
        return results

    def time_infer(self, feeds: Mapping[str, np.ndarray], repeats: int) -> list[float]:
        """Seconds per execution with the inputs already on the GPU, after one warm-up run.

        The runtime keeps its caches on the device, so SPS profiling must not time the
        host-to-device copy of every KV buffer that `infer` makes.
        """
        self._bind(feeds, ())
        self._execute()
        self.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self._execute()
            self.synchronize()
            times.append(time.perf_counter() - start)
        return times

    def synchronize(self) -> None:
        """Wait for everything queued on this runner's stream."""
        self._cuda.synchronize(self._stream)
        self._in_flight = False

    def _bind(self, feeds: Mapping[str, Any], device_outputs: Collection[str]
              ) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Pick the profile, set shapes, bind or upload inputs, bind outputs.

        Returns per output its shape and either its `DeviceArray` (device outputs) or the
        address of the device buffer it is written to (to be copied to the host).
        """
        if self._context is None:
            raise RuntimeError(f"{self.name}: the runner is closed")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        unknown = [n for n in device_outputs if n not in self.output_names]
        if unknown:
            raise KeyError(f"{self.name}: no outputs named {unknown}")
        if self._in_flight:  # reconfigure the context only once its last run has finished
            self.synchronize()
        values = {n: self._check_device(n, feeds[n]) if isinstance(feeds[n], DeviceArray)
                  else self._to_engine(n, feeds[n]) for n in self.input_names}
        profile = self.select_profile({n: tuple(v.shape) for n, v in values.items()
                                       if n not in self._host_inputs})
        ctx, cuda, stream = self._context, self._cuda, self._stream
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, stream):
                raise RuntimeError(f"{self.name}: could not switch to optimization profile "
                                   f"{profile}")
            self._profile = profile
        for n, value in values.items():
            if not ctx.set_input_shape(n, tuple(value.shape)):
                raise ValueError(f"{self.name}: shape {tuple(value.shape)} rejected for input "
                                 f"'{n}'")
        self._keep_alive = []  # host-resident (shape) inputs: TensorRT reads them at enqueue
        for n, value in values.items():
            if n in self._host_inputs:
                ptr = value.ctypes.data
                self._keep_alive.append(value)
            elif isinstance(value, DeviceArray):
                ptr = value.ptr
                if ptr % ALIGNMENT or not ptr:
                    ptr = self._buffer(n, value.nbytes)
                    cuda.memcpy(ptr, value.ptr, value.nbytes, _D2D, stream)
                    self.realigned += 1
            else:
                ptr = self._buffer(n, value.nbytes)
                cuda.memcpy(ptr, value.ctypes.data, value.nbytes, _H2D, stream)
            self._set_address(n, ptr)
        outputs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for n in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name}: output '{n}' has a data-dependent shape "
                                   f"{shape}, which this runner does not support")
            dtype = self._storage[n]
            if dtype is None:
                raise TypeError(f"{self.name}: output '{n}' has TensorRT type "
                                f"{self._dtypes[n]}, which has no numpy equivalent")
            if n in device_outputs:
                out = cuda.pool.array(shape, dtype)
                self._set_address(n, out.ptr)
            else:
                out = self._buffer(n, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
                self._set_address(n, out)
            outputs[n] = (shape, out)
        return outputs

    def _execute(self) -> None:
        """Enqueue the engine on the stream (no wait: see `run`)."""
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see the log above)")
        self._in_flight = True

    def _set_address(self, name: str, ptr: int) -> None:
        if not self._context.set_tensor_address(name, ptr):
            raise RuntimeError(f"{self.name}: TensorRT refused the address of '{name}'")

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Among the optimization profiles whose min..max ranges hold every input shape, the
        one whose `opt` shapes (what its kernels were tuned for) are nearest; ties go to the
        tightest. Nearness sums |log| ratios of shape to opt over the distinct (shape, opt)
        axis pairs, so an axis that many inputs share (the batch rows, the KV length) counts
        once. So a decode step of a few rows of gamma+1 tokens runs in the verify profile even
        where the prefill profile's ranges also hold it."""
        fitting = []
        for k, ranges in enumerate(self._ranges):
            if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in
                                                     zip(lo, shapes[n], hi))
                   for n, (lo, _, hi) in ranges.items()):
                pairs = {(int(s), int(o)) for n, (_, opt, _) in ranges.items()
                         for s, o in zip(shapes[n], opt)}
                distance = sum(abs(np.log((s + 1) / (o + 1))) for s, o in pairs)
                volume = sum(int(np.prod(hi)) for _, _, hi in ranges.values())
                fitting.append((round(float(distance), 9), volume, k))
        if not fitting:
            raise ValueError(f"{self.name}: input shapes {dict(shapes)} lie outside every "
                             "optimization profile of the engine (see the bundle's profile "
                             "limits: max_batch, max_context, prefill tokens)")
        return min(fitting)[2]

    def close(self) -> None:
        if getattr(self, "_context", None) is None:
            return
        if self._in_flight:
            self.synchronize()
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers.clear()
        self._context = self._engine = self._runtime = None

    def _buffer(self, name: str, nbytes: int) -> int:
        """This tensor's reusable device buffer, grown to hold `nbytes` (cudaFree waits for
        queued work, so dropping a smaller one is safe)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self._buffers[name] = DeviceAllocation.malloc(nbytes)
        return buffer.ptr

    def _check_device(self, name: str, value: DeviceArray) -> DeviceArray:
        if name in self._host_inputs:
            raise ValueError(f"{self.name}: input '{name}' is a shape tensor that TensorRT reads "
                             "from host memory; pass a numpy array")
        if np.dtype(value.dtype) != self._storage[name]:
            raise TypeError(f"{self.name}: input '{name}' is {self._dtypes[name]} (stored as "
                            f"{self._storage[name]}), got a device array of {value.dtype}")
        return value

    def _to_engine(self, name: str, value: Any) -> np.ndarray:
        """A host feed in the engine's storage type (float -> bf16 bits for BF16 tensors)."""
        if self._dtypes[name] == self._trt.DataType.BF16:
            value = np.asarray(value)
            return (np.ascontiguousarray(value) if value.dtype == np.uint16
                    else float32_to_bf16_bits(value))
        if self._storage[name] is None:
            raise TypeError(f"{self.name}: input '{name}' has TensorRT type "
                            f"{self._dtypes[name]}, which has no numpy equivalent")
        return np.ascontiguousarray(value, dtype=self._storage[name])

    def _from_engine(self, name: str, host: np.ndarray) -> np.ndarray:
        if self._dtypes[name] == self._trt.DataType.BF16:
            return bf16_bits_to_float32(host)
        return host


def _storage_dtype(trt: Any, dtype: Any) -> np.dtype | None:
    """The numpy dtype a tensor is stored as (bf16 as uint16 bits); None where numpy has none."""
    if dtype == trt.DataType.BF16:
        return np.dtype(np.uint16)
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


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
