"""TensorRT plugin `dspark::SpecVerify`, written against `tensorrt.plugin` (TensorRT 10.9+ and 11).

Not run in this project's CI or on its lent GPU (neither has the TensorRT builder); it follows
the documented Quickly Deployable Plugin API: `trtp.register` (shapes and types), `trtp.autotune`
(type combinations and tactics), `trtp.aot_impl` (the per-row Triton kernel compiled to PTX
when the engine is built, so the engine runs without Python, e.g. under trtexec or the C++
runtime) and `trtp.impl` (a torch-free fallback for builds that cannot use the AOT path).

The ONNX parser maps `verify.onnx` onto this plugin after `onnx_function.strip_function`: the
node's op type `SpecVerify` is the plugin name, its `plugin_namespace` attribute `dspark` the
namespace, and `aot` = 1 selects the ahead-of-time implementation.

No `from __future__ import annotations` here: tensorrt.plugin reads the real annotation objects.
"""
import functools
import re
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from dspark_runtime.backends.base import BackendUnavailable

PLUGIN_NAMESPACE = "dspark"
PLUGIN_NAME = "SpecVerify"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# Tactic -> bytes of logits per loop step (the Triton BLOCK); TensorRT times both at build.
TACTICS = {1: 16384, 2: 8192}
_N_INPUTS, _N_SCALARS, _N_OUTPUTS = 6, 3, 2
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

__all__ = ["PLUGIN_ID", "TACTICS", "compile_aot_kernel", "register"]


def _tensorrt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable(
            "the SpecVerify TensorRT plugin needs TensorRT >= 10.9 with its Python bindings: "
            "pip install 'dspark-export[tensorrt]' (served by NVIDIA's package index)") from exc
    return trt, trtp


def _drop_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Remove the kernel parameters after the first `keep` that the body never reads.

    Triton 3.3+ appends global- and profile-scratch pointers to every kernel; TensorRT's AOT
    launcher passes exactly inputs, extra scalars and outputs, so a kernel that needs no scratch
    must not declare them.
    """
    entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise ValueError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise ValueError(f"{name} declares {len(params)} parameters, expected at least {keep}")
    body = ptx[entry.end():]
    for extra in params[keep:]:
        param_name = extra.split()[-1]
        if re.search(rf"\b{re.escape(param_name)}\b", body):
            raise ValueError(f"{name} reads its extra parameter {param_name}; it cannot run as an AOT plugin")
    if len(params) == keep:
        return ptx
    kept = ",\n\t".join(params[:keep])
    return ptx[:entry.start(1)] + "\n\t" + kept + "\n" + ptx[entry.end(1):]


@functools.lru_cache(maxsize=None)
def compile_aot_kernel(logits_dtype: str, block_bytes: int = TACTICS[1],
                       target: Optional[Tuple[str, int, int]] = None) -> tuple[str, str, dict[str, int]]:
    """Compile the per-row kernel to PTX: (kernel name, PTX text, {"num_warps", "shared"}).

    `target` = (backend, arch, warp size), e.g. ("cuda", 90, 32), compiles without a GPU;
    by default Triton targets the current device. The PTX takes, in order, the six input
    pointers, G, V and cdiv(V, CHUNK) as int32, and the two output pointers (TensorRT's AOT
    argument order). V may be at most MAX_V.
    """
    if logits_dtype not in _TRITON_TYPES:
        raise ValueError(f"logits dtype must be one of {sorted(_TRITON_TYPES)}, got {logits_dtype!r}")
    from .triton_kernel import CHUNK, MAX_G, MAX_V, _next_pow2, build_kernels

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = build_kernels()["spec_verify"]
    signature = {"logits_ptr": f"*{_TRITON_TYPES[logits_dtype]}", "draft_ids_ptr": "*i64",
                 "draft_probs_ptr": "*fp32", "lengths_ptr": "*i64", "temperature_ptr": "*fp32",
                 "uniforms_ptr": "*fp32", "ws_m": "constexpr", "ws_s": "constexpr",
                 "ws_arg": "constexpr", "G": "i32", "V": "i32", "NC": "i32",
                 "accepted_ptr": "*i64", "tokens_ptr": "*i64", "BLOCK": "constexpr",
                 "G1_P2": "constexpr", "CHUNK": "constexpr", "NC_P2": "constexpr",
                 "USE_WS": "constexpr"}
    itemsize = 4 if logits_dtype == "float32" else 2
    constexprs = {"ws_m": None, "ws_s": None, "ws_arg": None,
                  "BLOCK": min(block_bytes // itemsize, CHUNK), "G1_P2": _next_pow2(MAX_G + 1),
                  "CHUNK": CHUNK, "NC_P2": _next_pow2(-(-MAX_V // CHUNK)), "USE_WS": False}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget(*target) if target else None,
                              options={"num_warps": 8})
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError("the SpecVerify kernel unexpectedly needs Triton scratch memory")
    ptx = _drop_unused_trailing_params(compiled.asm["ptx"], meta.name,
                                       _N_INPUTS + _N_SCALARS + _N_OUTPUTS)
    return meta.name, ptx, {"num_warps": meta.num_warps, "shared": meta.shared}


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    if dtype == trt.bfloat16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({trt.float32: np.float32, trt.float16: np.float16, trt.int64: np.int64}[dtype])


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailable("the SpecVerify JIT fallback needs cuda-python "
                                      "(pip install 'dspark-export[tensorrt]')") from exc
    return cudart


def _check(result: tuple) -> None:
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")


def _to_host(trt: Any, cudart: Any, tensor: Any, stream: int) -> np.ndarray:
    host = np.empty(tuple(tensor.shape), dtype=_numpy_dtype(trt, tensor.dtype))
    _check(cudart.cudaMemcpyAsync(host.ctypes.data, tensor.data_ptr, host.nbytes,
                                  cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    return host


_registered = False


def register() -> None:
    """Register `dspark::SpecVerify` with TensorRT's plugin registry (idempotent)."""
    global _registered
    trt, trtp = _tensorrt()
    if not _registered:
        _define(trt, trtp)
        _registered = True


def _define(trt: Any, trtp: Any) -> None:
    """The four decorated functions; their signatures follow the tensorrt.plugin schemas."""

    @trtp.register(PLUGIN_ID)
    def spec_verify_desc(target_logits: trtp.TensorDesc, draft_ids: trtp.TensorDesc,
                         draft_probs: trtp.TensorDesc, verify_lengths: trtp.TensorDesc,
                         temperature: trtp.TensorDesc,
                         uniforms: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        batch, slots = target_logits.shape_expr[0], target_logits.shape_expr[1]
        return (trtp.from_shape_expr((batch,), dtype=trt.int64),
                trtp.from_shape_expr((batch, slots), dtype=trt.int64))

    @trtp.autotune(PLUGIN_ID)
    def spec_verify_autotune(target_logits: trtp.TensorDesc, draft_ids: trtp.TensorDesc,
                             draft_probs: trtp.TensorDesc, verify_lengths: trtp.TensorDesc,
                             temperature: trtp.TensorDesc, uniforms: trtp.TensorDesc,
                             outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        combination = trtp.AutoTuneCombination()
        combination.pos(0, "FP32|FP16|BF16")
        combination.pos([1, 3, 6, 7], "INT64")
        combination.pos([2, 4, 5], "FP32")
        combination.tactics(list(TACTICS))
        return [combination]

    @trtp.aot_impl(PLUGIN_ID)
    def spec_verify_aot(target_logits: trtp.TensorDesc, draft_ids: trtp.TensorDesc,
                        draft_probs: trtp.TensorDesc, verify_lengths: trtp.TensorDesc,
                        temperature: trtp.TensorDesc, uniforms: trtp.TensorDesc,
                        outputs: Tuple[trtp.TensorDesc], tactic: int,
                        ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        dtype = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}[target_logits.dtype]
        from .triton_kernel import CHUNK, MAX_V

        name, ptx, meta = compile_aot_kernel(dtype, TACTICS.get(tactic, TACTICS[1]))
        shape = target_logits.shape_expr
        launch = trtp.KernelLaunchParams()
        launch.grid_x = shape[0]  # one program per batch row
        launch.block_x = meta["num_warps"] * 32
        launch.shared_mem = meta["shared"]
        if not shape[2].is_fake and shape[2].is_constant and shape[2].constant_value() > MAX_V:
            raise ValueError(f"the SpecVerify AOT kernel supports V <= {MAX_V}")
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(shape[1] - 1), trtp.SymInt32(shape[2]),
                                               trtp.SymInt32(trtp.cdiv(shape[2], CHUNK))])
        return name.encode(), ptx.encode(), launch, scalars

    @trtp.impl(PLUGIN_ID)
    def spec_verify_impl(target_logits: trtp.Tensor, draft_ids: trtp.Tensor, draft_probs: trtp.Tensor,
                         verify_lengths: trtp.Tensor, temperature: trtp.Tensor, uniforms: trtp.Tensor,
                         outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
        # Torch- and Triton-free: copy to the host, run the NumPy reference, copy back. Slow
        # (two host round trips) but correct wherever the AOT path cannot be built.
        from .reference import spec_verify

        cudart = _cudart()
        host = [_to_host(trt, cudart, t, stream) for t in (target_logits, draft_ids, draft_probs,
                                                           verify_lengths, temperature, uniforms)]
        _check(cudart.cudaStreamSynchronize(stream))
        results = spec_verify(*host)
        for array, out in zip(results, outputs):
            array = np.ascontiguousarray(array, dtype=np.int64)
            _check(cudart.cudaMemcpyAsync(out.data_ptr, array.ctypes.data, array.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        _check(cudart.cudaStreamSynchronize(stream))  # `results` must outlive the copies
