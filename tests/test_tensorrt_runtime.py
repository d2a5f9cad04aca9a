"""TensorRT runtime: device memory (cuda_memory.py), the TensorRT runner's device interface,
and the draft/verify loop over a TensorRT bundle.

Two kinds of test, kept apart on purpose:
- against FAKES (always run). `FakeCudaLib` stands in for libcudart: device pointers are
  256-byte aligned host addresses, copies are memmoves, and every device access is checked
  against the live allocations. `fake_tensorrt` stands in for the tensorrt module: its
  "engines" run an ONNX graph with ONNX Runtime's CPU provider on that memory and enforce
  what TensorRT documents (input shapes within the active optimization profile, 256-byte
  aligned addresses, an address for every tensor). They check which calls our code makes, with
  which shapes, addresses and streams, and that the loop gives the ONNX Runtime CPU path's
  tokens through them. They prove nothing about TensorRT or CUDA themselves.
- against the real tensorrt on a GPU: skipped, with the reason shown, where it is not
  installed (PyPI has stubs only; NVIDIA's index is unreachable from CI).
"""
from __future__ import annotations

import bisect
import ctypes
import json
import sys
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from test_bundle import make_tiny_export
from conftest import export_tiny_pair
from test_runtime import MAX_NEW, PROMPTS

from dspark_export.build.bundle_writer import BundleWriter
from dspark_export.build.profiles import TokenRange, load_profile
from dspark_export.build.tensorrt_build import PLUGIN, optimization_profiles
from dspark_runtime import cuda_memory as cuda
from dspark_runtime.backends.base import Runner
from dspark_runtime.backends import BackendUnavailable
from dspark_runtime.cuda_memory import (CudaMemory, DeviceAllocation, DeviceArray, DevicePool,
                                        device_array)
from dspark_runtime.backends.tensorrt import (TensorRTRunner, bf16_bits_to_float32,
                                              float32_to_bf16_bits)
from dspark_runtime.bundle import GRAPH_NAMES, BundleError
from dspark_runtime.gpu import gpu_info
from dspark_runtime.kv import HostMemory

H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
NO_TRT = "tensorrt is not installed here (PyPI has stubs only; it comes from NVIDIA's index)"
FAKE_TRT_VERSION = "11.0.0.1"


# --- a fake libcudart over host memory -------------------------------------------------------

def _value(pointer) -> int:
    return (pointer.value or 0) if isinstance(pointer, ctypes.c_void_p) else int(pointer or 0)


class FakeCudaLib:
    """libcudart's functions as `_CudaRuntime` calls them, on host memory (FAKE)."""

    def __init__(self):
        self.blocks: dict[int, tuple[ctypes.Array, int]] = {}  # aligned start -> (memory, size)
        self.starts: list[int] = []
        self.calls: Counter = Counter()
        self.copies: list[tuple[int, int, int | None]] = []  # (kind, bytes, stream)
        self.fail_mallocs = 0  # the next n cudaMalloc calls report out-of-memory
        self.next_stream = 0x5000

    # bookkeeping
    def is_device(self, ptr: int, nbytes: int = 1) -> bool:
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0:
            return False
        start = self.starts[i]
        return ptr + nbytes <= start + self.blocks[start][1]

    def check_device(self, ptr: int, nbytes: int) -> None:
        assert self.is_device(ptr, max(nbytes, 1)), f"{nbytes} bytes at {ptr:#x}: not device memory"

    # the runtime API
    def cudaMalloc(self, ref, size):
        self.calls["cudaMalloc"] += 1
        if self.fail_mallocs:
            self.fail_mallocs -= 1
            return 2  # cudaErrorMemoryAllocation
        memory = (ctypes.c_char * (size + 256))()
        start = (ctypes.addressof(memory) + 255) & ~255
        self.blocks[start] = (memory, size)
        bisect.insort(self.starts, start)
        ref._obj.value = start
        return 0

    def cudaFree(self, ptr):
        self.calls["cudaFree"] += 1
        ptr = _value(ptr)
        if ptr not in self.blocks:
            return 1
        del self.blocks[ptr]
        self.starts.remove(ptr)
        return 0

    def cudaMemset(self, ptr, value, nbytes):
        self.calls["cudaMemset"] += 1
        self.check_device(_value(ptr), nbytes)
        ctypes.memset(_value(ptr), value, nbytes)
        return 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.calls["cudaMemcpyAsync"] += 1
        dst, src = _value(dst), _value(src)
        if kind in (1, 3):
            self.check_device(dst, nbytes)
        if kind in (2, 3):
            self.check_device(src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        self.copies.append((kind, nbytes, _value(stream)))
        return 0

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self.calls["cudaMemcpy2DAsync"] += 1
        dst, src = _value(dst), _value(src)
        assert kind == 3 and width <= dpitch and width <= spitch
        for r in range(height):
            self.check_device(dst + r * dpitch, width)
            self.check_device(src + r * spitch, width)
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.copies.append((kind, width * height, _value(stream)))
        return 0

    def cudaStreamCreate(self, ref):
        self.calls["cudaStreamCreate"] += 1
        self.next_stream += 1
        ref._obj.value = self.next_stream
        return 0

    def cudaStreamSynchronize(self, stream):
        self.calls["cudaStreamSynchronize"] += 1
        return 0

    def cudaDeviceSynchronize(self):
        self.calls["cudaDeviceSynchronize"] += 1
        return 0

    def cudaGetLastError(self):
        return 0

    def cudaGetErrorString(self, status):
        return b"fake CUDA error"

    # test helpers
    def upload(self, array: np.ndarray) -> DeviceArray:
        out = CudaMemory().allocate(array.shape, array.dtype)
        ctypes.memmove(out.ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)
        return out

    def download(self, array: DeviceArray) -> np.ndarray:
        self.check_device(array.ptr, array.nbytes)
        host = np.empty(array.shape, dtype=array.dtype)
        ctypes.memmove(host.ctypes.data, array.ptr, array.nbytes)
        return host


@pytest.fixture()
def fake_cuda(monkeypatch) -> FakeCudaLib:
    lib = FakeCudaLib()
    monkeypatch.setattr(cuda, "_CUDART", cuda._CudaRuntime(lib))
    return lib


# --- cuda_memory.py: the ORT-verified commit logic, now also the TensorRT memory -----------

def test_cuda_memory_commit_and_leading_match_host_memory(fake_cuda):
    """CudaMemory's strided device copies do what HostMemory's numpy indexing does."""
    rng = np.random.default_rng(0)
    memory, host = CudaMemory(), HostMemory()
    caches = [rng.normal(size=(3, 2, 7, 4)).astype(np.float32) for _ in range(2)]
    presents = [rng.normal(size=(3, 2, 3, 4)).astype(np.float32) for _ in range(2)]
    lengths, counts = np.array([0, 4, 2]), np.array([3, 0, 2])
    zeros = memory.empty((3, 2, 7, 4), np.float32)
    assert not fake_cuda.download(zeros).any() and fake_cuda.calls["cudaMemset"] == 1
    on_device = [fake_cuda.upload(c) for c in caches]
    memory.commit([memory.rows(c, 1, 3) for c in on_device],
                  [fake_cuda.upload(p).rows(1, 3) for p in presents], lengths[1:], counts[1:])
    host.commit([host.rows(c, 1, 3) for c in caches], [p[1:3] for p in presents], lengths[1:],
                counts[1:])
    for got, want in zip(on_device, caches):
        np.testing.assert_array_equal(fake_cuda.download(got), want)
    probs = rng.random((3, 4, 5)).astype(np.float32)
    lead = memory.leading(fake_cuda.upload(probs), 2)  # a strided copy into a new buffer
    np.testing.assert_array_equal(fake_cuda.download(lead), probs[:, :2])
    one = fake_cuda.upload(probs[:1])
    view = memory.leading(one, 2)  # one row: a view, no copy
    assert view.ptr == one.ptr and view.shape == (1, 2, 5)
    assert fake_cuda.calls["cudaDeviceSynchronize"] == 1  # leading waits for its copy
    for length in (9, 5):  # grown and shrunk: the kept positions, zeros after them
        moved = fake_cuda.download(memory.resized(on_device[0], length))
        keep = min(length, 7)
        np.testing.assert_array_equal(moved[:, :, :keep], caches[0][:, :, :keep])
        assert moved.shape == (3, 2, length, 4) and not moved[:, :, keep:].any()
    memory.copy_prefix(on_device[1], 0, 2, 5)  # row 2 takes row 0's first 5 positions
    caches[1][2, :, :5] = caches[1][0, :, :5]
    np.testing.assert_array_equal(fake_cuda.download(on_device[1]), caches[1])


def test_allocations_are_freed_with_their_last_view(fake_cuda):
    array = CudaMemory().allocate((2, 0, 4), np.float32)
    assert array.ptr % cuda.ALIGNMENT == 0 and fake_cuda.blocks[array.ptr][1] == cuda.MIN_ALLOCATION
    view = array.rows(1, 2)
    del array
    assert fake_cuda.calls["cudaFree"] == 0  # the view keeps the allocation alive
    del view
    assert fake_cuda.calls["cudaFree"] == 1 and not fake_cuda.blocks
    allocation = DeviceAllocation.malloc(1000)
    allocation.free()
    allocation.free()  # idempotent
    assert fake_cuda.calls["cudaFree"] == 2 and not allocation.alive
    with pytest.raises(ValueError, match="cannot hold"):
        device_array((100,), np.float32, DeviceAllocation.malloc(8))


def test_device_pool_reuses_blocks_and_survives_out_of_memory(fake_cuda):
    pool = cuda._cudart().pool
    assert [DevicePool.block_size(n) for n in (0, 1, 256, 257, 5000)] == [256, 256, 256, 512,
                                                                           8192]
    a = pool.array((3, 5), np.float32)
    ptr = a.ptr
    del a
    assert pool.cached_bytes == 256 and not fake_cuda.calls["cudaFree"]
    b = pool.array((2, 7), np.float32)  # same size class: the same block, no cudaMalloc
    assert b.ptr == ptr and pool.mallocs == 1
    c = pool.array((1000,), np.float32)
    del c
    fake_cuda.fail_mallocs = 1  # out of memory with a block cached: release, then retry
    d = pool.array((3000,), np.float32)
    assert pool.mallocs == 3 and fake_cuda.calls["cudaFree"] == 1 and fake_cuda.is_device(d.ptr)
    del d
    pool.release()
    fake_cuda.fail_mallocs = 1
    with pytest.raises(MemoryError, match="out of memory"):
        pool.array((10,), np.float32)
    assert b.ptr in fake_cuda.blocks  # a block in use is never released


# --- a fake tensorrt whose engines run ONNX graphs with ONNX Runtime on the fake memory ------

class _Enum:
    def __init__(self, *names: str):
        for name in names:
            setattr(self, name, name)


_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}
_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32,
                 "BOOL": np.bool_}


def write_engine(path: Path, onnx_path: Path, profiles: list[dict], **extra) -> Path:
    """A fake engine file: the ONNX graph it runs, its optimization profiles
    ({input: (min, opt, max)} each), `dtypes` overrides ("BF16") and `host_inputs`."""
    spec = {"onnx": str(onnx_path), "profiles": [{n: [list(s) for s in r] for n, r in p.items()}
                                                 for p in profiles], **extra}
    path.write_text(json.dumps(spec))
    return path


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.profile = engine, 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index, stream):
        assert 0 <= index < self.engine.num_optimization_profiles
        self.engine.log.append(("profile", self.engine.name, index, stream))
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        shape = tuple(shape)
        if name not in self.engine.host_inputs:
            lo, _, hi = self.engine.profiles[self.profile][name]
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False  # TensorRT: outside the active profile
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes[name]
        symbols = {}
        for n, meta in self.engine.inputs.items():
            for d, s in zip(meta.shape, self.shapes[n]):
                if isinstance(d, str):
                    symbols[d] = s
        return tuple(symbols.get(d, -1) if isinstance(d, str) else d
                     for d in self.engine.outputs[name].shape)

    def set_tensor_address(self, name, ptr):
        if ptr % 256 and name not in self.engine.host_inputs:
            return False  # "The pointer must have at least 256-byte alignment."
        self.addresses[name] = ptr
        return True

    def _view(self, name, shape) -> np.ndarray:
        dtype = self.engine.storage(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = self.addresses[name]
        if name not in self.engine.host_inputs:
            self.engine.cuda.check_device(ptr, nbytes)
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream):
        engine = self.engine
        feeds = {}
        for n in engine.inputs:
            value = self._view(n, self.shapes[n]).copy()
            feeds[n] = bf16_bits_to_float32(value) if engine.dtypes.get(n) == "BF16" else value
        engine.log.append(("execute", engine.name, self.profile,
                           {n: (self.shapes[n], self.addresses[n]) for n in engine.inputs},
                           stream))
        results = engine.session.run(list(engine.outputs), feeds)
        for n, value in zip(engine.outputs, results):
            assert value.shape == self.get_tensor_shape(n), (n, value.shape)
            if engine.dtypes.get(n) == "BF16":
                value = float32_to_bf16_bits(value)
            self._view(n, value.shape)[...] = value
        return True


class _FakeEngine:
    def __init__(self, spec: dict, log: list, cuda_lib: FakeCudaLib):
        self.name, self.log, self.cuda = Path(spec["onnx"]).stem, log, cuda_lib
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.profiles = [{n: tuple(tuple(s) for s in r) for n, r in p.items()}
                         for p in spec["profiles"]]
        self.dtypes = spec.get("dtypes", {})
        self.host_inputs = set(spec.get("host_inputs", []))
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(self.profiles)

    def storage(self, name):
        dtype = self.get_tensor_dtype(name)
        return np.dtype(np.uint16 if dtype == "BF16" else _TRT_TO_NUMPY[dtype])

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        meta = self.inputs.get(name) or self.outputs[name]
        return self.dtypes.get(name, _ORT_TO_TRT[meta.type])

    def get_tensor_shape(self, name):
        meta = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in meta.shape)

    def get_tensor_location(self, name):
        return "HOST" if name in self.host_inputs else "DEVICE"

    def get_tensor_profile_shape(self, name, k):
        assert name not in self.host_inputs, "shape tensors have profile values, not shapes"
        return list(self.profiles[k][name])

    def create_execution_context(self):
        return _FakeContext(self)


def fake_tensorrt(log: list, cuda_lib: FakeCudaLib) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = FAKE_TRT_VERSION
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = _Enum("INPUT", "OUTPUT")
    trt.TensorLocation = _Enum("DEVICE", "HOST")
    trt.DataType = _Enum("FLOAT", "HALF", "BF16", "INT64", "INT32", "BOOL", "FP8")

    def nptype(dtype):
        if dtype not in _TRT_TO_NUMPY:
            raise TypeError(f"no numpy type for {dtype}")
        return _TRT_TO_NUMPY[dtype]

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            try:
                spec = json.loads(data)
            except ValueError:
                return None
            log.append(("deserialize", Path(spec["onnx"]).stem, self.engine_host_code_allowed))
            return _FakeEngine(spec, log, cuda_lib)

    trt.nptype, trt.Runtime = nptype, Runtime
    return trt


@pytest.fixture()
def fake_trt(monkeypatch, fake_cuda, fake_gpu) -> list:
    """tensorrt (fake) on an H100 (fake) over the fake CUDA runtime; returns the call log."""
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log, fake_cuda))
    fake_gpu(H100_GPU)
    plugin = types.ModuleType("dspark_plugins.spec_verify.tensorrt_plugin")
    plugin.register = lambda: log.append(("register",))
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    return log


def _double_graph(path: Path) -> Path:
    """y = 2 * x and s = sum(x) per row, x float32 [rows, n]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "n"])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["rows"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"]),
                               helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0)],
                              "double", [x], [y, s], initializer=[two, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


TWO_PROFILES = [{"x": ((1, 1), (1, 4), (2, 4))}, {"x": ((1, 1), (8, 64), (16, 64))}]


@pytest.fixture()
def double_engine(tmp_path) -> Path:
    return write_engine(tmp_path / "double.engine", _double_graph(tmp_path / "double.onnx"),
                        TWO_PROFILES, dtypes={"y": "BF16"})


# --- the runner on the fakes -------------------------------------------------------------------

def test_runner_host_arrays_profiles_and_plugins(tmp_path, monkeypatch, fake_trt, fake_cuda,
                                                 double_engine):
    registered = []
    plugin = types.ModuleType("fake_plugin")
    plugin.register = lambda: registered.append(True)
    monkeypatch.setitem(sys.modules, "fake_plugin", plugin)
    runner = TensorRTRunner(double_engine, plugins=[
        {"aot": True, "register": "fake_plugin:register"},
        {"aot": False, "register": "fake_plugin:register"}])
    assert registered == [True]  # only the plugin without an embedded kernel
    assert isinstance(runner, Runner) and isinstance(runner.memory, CudaMemory)
    assert runner.input_names == ["x"] and runner.output_names == ["y", "s"]
    assert runner.input_shapes == {"x": (-1, -1)} and runner.input_dtypes == {"x": np.float32}
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = runner.infer({"x": x})
    np.testing.assert_array_equal(out["y"], 2 * x)  # bf16 on the device, float32 back
    np.testing.assert_array_equal(out["s"], x.sum(axis=1))
    switches = [e for e in fake_trt if e[0] == "profile"]
    assert switches == []  # profile 0 (tightest) is the default one
    big = np.ones((8, 40), dtype=np.float32)
    np.testing.assert_array_equal(runner.infer({"x": big})["y"], 2 * big)
    runner.infer({"x": x})
    assert [e[2] for e in fake_trt if e[0] == "profile"] == [1, 0]
    times = runner.time_infer({"x": big}, repeats=3)  # inputs uploaded once, engine timed
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert [e[2] for e in fake_trt if e[0] == "profile"] == [1, 0, 1]
    with pytest.raises(ValueError, match="outside every optimization profile"):
        runner.infer({"x": np.ones((17, 2), np.float32)})
    with pytest.raises(KeyError, match="missing inputs"):
        runner.infer({})
    with pytest.raises(KeyError, match="no outputs named"):
        runner.run({"x": x}, device_outputs=["nope"])
    runner.close()
    runner.close()  # idempotent
    assert not fake_cuda.blocks  # every upload / output buffer freed
    with pytest.raises(RuntimeError, match="closed"):
        runner.infer({"x": x})


def test_runner_from_bundle_and_bad_engine(tmp_path, monkeypatch, fake_trt, double_engine):
    from dspark_runtime.bundle import Bundle

    registered = []
    plugin = types.ModuleType("fake_plugin")
    plugin.register = lambda: registered.append(True)
    monkeypatch.setitem(sys.modules, "fake_plugin", plugin)
    bundle = Bundle(tmp_path, {"graphs": {"double": {"file": "double.engine"}}, "tensorrt": {
        "version_compatible": True, "plugins": [{"graph": "verify", "aot": False,
                                                 "register": "fake_plugin:register"}]}})
    TensorRTRunner.from_bundle(bundle, "double").close()
    assert registered == [] and fake_trt[-1] == ("deserialize", "double", True)
    double_engine.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="could not deserialize"):
        TensorRTRunner(double_engine)


def test_runner_device_feeds_outputs_and_streams(tmp_path, fake_trt, fake_cuda):
    engine = write_engine(tmp_path / "double.engine", _double_graph(tmp_path / "double.onnx"),
                          TWO_PROFILES)
    runner, other = TensorRTRunner(engine), TensorRTRunner(engine)
    stream = cuda._cudart().stream()
    assert runner._stream == other._stream == stream  # one stream for every TensorRT runner
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    feed = fake_cuda.upload(x)
    syncs = fake_cuda.calls["cudaStreamSynchronize"]
    out = runner.run({"x": feed}, device_outputs=["y", "s"])
    assert fake_cuda.calls["cudaStreamSynchronize"] == syncs  # device only: no wait
    assert isinstance(out["y"], DeviceArray) and out["y"].shape == (2, 6)
    assert isinstance(out["y"].owner, DeviceAllocation)
    execute = [e for e in fake_trt if e[0] == "execute"][-1]
    assert execute[3]["x"] == ((2, 6), feed.ptr) and execute[4] == stream  # bound in place
    assert "x" not in runner._buffers  # ... so no upload buffer exists for it
    np.testing.assert_array_equal(fake_cuda.download(out["y"]), 2 * x)
    # A device output feeds the next graph in place; a host output makes the run wait once.
    again = other.run({"x": out["y"]}, device_outputs=["y"])
    assert fake_cuda.calls["cudaStreamSynchronize"] == syncs + 1
    assert isinstance(again["s"], np.ndarray)
    np.testing.assert_array_equal(again["s"], (2 * x).sum(axis=1))
    np.testing.assert_array_equal(fake_cuda.download(again["y"]), 4 * x)
    assert {s for kind, _, s in fake_cuda.copies if kind in (1, 2)} == {stream}
    # Outputs come from the pool: a dropped block serves the next run without cudaMalloc.
    pool = cuda._cudart().pool
    mallocs = pool.mallocs
    del out, again
    runner.run({"x": feed}, device_outputs=["y", "s"])
    assert pool.mallocs == mallocs
    # A row window whose address is not 256-byte aligned is copied to an aligned buffer.
    window = feed.rows(1, 2)
    assert window.ptr % 256
    res = runner.run({"x": window})
    assert runner.realigned == 1 and (3, 24, stream) in fake_cuda.copies
    np.testing.assert_array_equal(res["y"], 2 * x[1:])
    with pytest.raises(TypeError, match="stored as float32.*int64"):
        runner.run({"x": fake_cuda.upload(np.zeros((2, 3), np.int64))})
    runner.close()
    other.close()


def test_runner_host_location_inputs(tmp_path, fake_trt, fake_cuda):
    """A shape tensor (TensorLocation.HOST) is bound to host memory, never uploaded."""
    engine = write_engine(tmp_path / "double.engine", _double_graph(tmp_path / "double.onnx"),
                          [{}], host_inputs=["x"])
    runner = TensorRTRunner(engine)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(runner.infer({"x": x})["y"], 2 * x)
    assert "x" not in runner._buffers and not any(k == 1 for k, _, _ in fake_cuda.copies)
    with pytest.raises(ValueError, match="shape tensor"):
        runner.run({"x": fake_cuda.upload(x)})
    runner.close()


def test_bf16_conversion_rounds_to_nearest_even():
    x = np.array([1.0, -2.5, 3.14159, 1e-40, np.inf, np.nan, 1.00390625], dtype=np.float32)
    back = bf16_bits_to_float32(float32_to_bf16_bits(x))
    assert back[0] == 1.0 and back[1] == -2.5 and back[4] == np.inf and np.isnan(back[5])
    assert abs(back[2] - 3.140625) < 1e-7
    assert back[6] == 1.0  # exactly halfway: ties to even


# --- the loop on a TensorRT bundle (fake engines over the exported graphs) ------------------

def write_trt_bundle(export: Path, out: Path, *, plugin_aot: bool = True,
                     engine_profiles: dict[str, list[dict]] | None = None) -> Path:
    """A TensorRT bundle as `build` writes it, whose engines are fake (ONNX Runtime); their
    optimization profiles are the build's own (`optimization_profiles` for profile h100)."""
    info = json.loads((export / "export.json").read_text())
    profile = load_profile("h100")
    gamma, vocab = int(info["gamma"]), int(info["target"]["vocab_size"])
    engines = {}
    with BundleWriter(out) as writer:
        for name in GRAPH_NAMES:
            graph = onnx.load(str(export / f"{name}.onnx"), load_external_data=False)
            shapes = optimization_profiles(graph, name, profile, gamma, vocab)
            profiles = (engine_profiles or {}).get(name) or [dims for _, dims in shapes]
            write_engine(writer.path(f"{name}.engine"), export / f"{name}.onnx", profiles)
            engines[name] = {"file": f"{name}.engine", "optimization_profiles": [
                {"name": label, "shapes": {t: [list(s) for s in r] for t, r in dims.items()}}
                for label, dims in shapes]}
        writer.add_file(export / "tokenizer")
        writer.write_manifest(
            profile=profile, export_info=info, graphs={n: f"{n}.engine" for n in GRAPH_NAMES},
            tensorrt={"version": FAKE_TRT_VERSION, "gpu_name": H100_GPU["name"],
                      "compute_capability": "9.0", "strongly_typed": True,
                      "hardware_compatibility": "none", "version_compatible": False,
                      "plugins": [dict(PLUGIN, aot=plugin_aot)], "engines": engines})
    return out


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """The exported tiny pair of test_runtime.py (shared when both files run in one session)."""
    return export_tiny_pair(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cpu_pipe(tiny_export):
    from dspark_runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_export, backend="cpu")


def test_pipeline_on_tensorrt_bundle_gives_the_onnxruntime_tokens(tiny_export, cpu_pipe,
                                                                  tmp_path, fake_trt, fake_cuda):
    from dspark_runtime.pipeline import Pipeline

    bundle = write_trt_bundle(tiny_export, tmp_path / "trt_bundle")
    pipe = Pipeline.from_bundle(bundle)
    assert all(isinstance(r, TensorRTRunner) for r in pipe.runners.values())
    assert isinstance(pipe.memory, CudaMemory) and pipe.gamma == cpu_pipe.gamma
    assert ("register",) not in fake_trt  # the AOT plugin kernel is inside the engine
    for case in (dict(), dict(temperature=1.0, seed=4), dict(target_only=True),
                 dict(temperature=1.0, seed=3, target_only=True)):
        want = cpu_pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, **case)
        got = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, **case)
        assert [r.token_ids for r in got.requests] == [r.token_ids for r in want.requests], case
        assert got.requests[0].accepted == want.requests[0].accepted
    target = pipe.runners["target"]
    # Caches and device outputs are bound in place: only the host feeds, the host logits and
    # (for a row window not 256-byte aligned) realigned cache views have runner buffers.
    host_side = {"input_ids", "position_ids", "past_lengths", "new_lengths", "logits"}
    realigned = {n for n in target._buffers if n.startswith(("past_key_", "past_value_"))}
    assert set(target._buffers) - realigned == host_side
    assert not realigned or target.realigned
    assert set(pipe.runners["markov"]._buffers) == {
        "anchor_ids", "temperature", "uniforms", "draft_ids", "confidence_logits"}
    # Prefill ran in the prefill profile (0), decode steps in the verify profile (1).
    runs = [e for e in fake_trt if e[0] == "execute" and e[1] == "target"]
    assert {e[2] for e in runs if e[3]["input_ids"][0][1] > 5} == {0}
    assert {e[2] for e in runs if e[3]["input_ids"][0][1] <= 5} == {1}
    stream = cuda._cudart().stream()
    assert {e[4] for e in fake_trt if e[0] == "execute"} == {stream}
    pipe.close()


def test_pipeline_registers_jit_plugins_before_the_verify_engine(tiny_export, tmp_path,
                                                                 fake_trt):
    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(write_trt_bundle(tiny_export, tmp_path / "b", plugin_aot=False))
    events = [e[:2] for e in fake_trt if e[0] in ("register", "deserialize")]
    assert events.index(("register",)) < events.index(("deserialize", "verify"))
    assert events.count(("register",)) == 1  # only for the graph that holds the plugin
    pipe.close()


def test_verify_engine_accepts_shorter_verify_widths(tiny_export, tmp_path, fake_trt):
    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(write_trt_bundle(tiny_export, tmp_path / "b"))
    verify, gamma = pipe.runners["verify"], pipe.gamma
    width = gamma  # one draft fewer than the block: what `threshold` gives when it cuts
    verify.select_profile({"target_logits": (2, width, 256), "draft_ids": (2, width - 1),
                           "draft_probs": (2, width - 1, 256), "verify_lengths": (2,),
                           "temperature": (2,), "uniforms": (2, width)})


# --- clear refusals ----------------------------------------------------------------------------

@pytest.fixture()
def tiny_trt_bundle(tmp_path) -> Path:
    """A TensorRT bundle over test_bundle's tiny graphs (no torch export): for refusals."""
    return write_trt_bundle(make_tiny_export(tmp_path / "export"), tmp_path / "trt")


def test_missing_tensorrt_names_the_extra(tiny_trt_bundle, monkeypatch):
    from dspark_export.cli_run import run
    from dspark_runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BundleError, match=r"dspark-export\[tensorrt\]"):
        Pipeline.from_bundle(tiny_trt_bundle)
    result = CliRunner().invoke(run, [str(tiny_trt_bundle), "--prompt", "hi"])
    assert result.exit_code == 1 and "dspark-export[tensorrt]" in result.output


def test_tensorrt_bundle_refuses_the_cpu(tiny_trt_bundle, fake_trt):
    from dspark_runtime.pipeline import Pipeline

    with pytest.raises(BackendUnavailable, match="runs on an NVIDIA GPU only"):
        Pipeline.from_bundle(tiny_trt_bundle, backend="cpu")


# --- the real thing (skipped where tensorrt is absent) -----------------------------------------

@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_pipeline_matches_onnxruntime(tiny_export, cpu_pipe, tmp_path):
    """Build fp32 engines for the tiny pair, run the loop on them, compare with ORT on CPU."""
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    gpu = gpu_info()
    if gpu is None:
        pytest.skip("tensorrt is installed but no CUDA GPU is visible")
    from dspark_export.build.tensorrt_build import build_engines
    from dspark_runtime.pipeline import Pipeline

    major, minor = gpu["compute_capability"].split(".")
    h100 = load_profile("h100")
    profile = replace(h100, precision="fp32", max_batch=4, max_context=256, tensorrt=replace(
        h100.tensorrt, compute_capability=f"sm{major}{minor}", verify_tokens_opt=8,
        prefill_tokens=TokenRange(1, 16, 64), timing_cache=False))
    engines = tmp_path / "engines"
    engines.mkdir()
    info = build_engines(tiny_export, profile, engines)
    assert info["version"] == trt.__version__
    export_info = json.loads((tiny_export / "export.json").read_text())
    with BundleWriter(tmp_path / "bundle") as writer:
        for name in GRAPH_NAMES:
            writer.add_file(engines / f"{name}.engine")
        writer.add_file(tiny_export / "tokenizer")
        writer.write_manifest(profile=profile, export_info=export_info,
                              graphs={n: f"{n}.engine" for n in GRAPH_NAMES}, tensorrt=info)
    pipe = Pipeline.from_bundle(tmp_path / "bundle")
    want = cpu_pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, target_only=True)
    alone = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW, target_only=True)
    spec = pipe.generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.token_ids for r in alone.requests] == [r.token_ids for r in want.requests]
    assert [r.token_ids for r in spec.requests] == [r.token_ids for r in alone.requests]
