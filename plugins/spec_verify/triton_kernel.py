"""SpecVerify in Triton: one program per batch row, fused over the vocabulary.

Each program walks positions 0..a of its row only (a = accepted count, found on the way):
an online pass over V gives the max, the softmax denominator and the first argmax of the
position, the acceptance test of draft k then needs three scalar loads, and the first rejection
(or the bonus position) ends the walk. A sampling row then draws its token from per-chunk
weight sums (one pipelined pass over one row, or none for a bonus after the split-V pre-pass)
and a scan of the single chunk where the cdf crosses the threshold. So a row reads (a + 1)
logits rows, not G + 1, and one draft-probability row at most.

When the batch has fewer rows than half the SMs, `spec_verify_triton` first runs a split-V
statistics kernel over (row, position, chunk) so that the whole GPU reads the logits; the
per-row kernel then merges the chunk statistics instead of re-reading V. The TensorRT plugin
uses the per-row kernel alone (an AOT plugin launches one kernel and has no workspace).

Importing this module never needs triton or torch; the functions raise ImportError naming the
missing package.
"""
from __future__ import annotations

import functools
from typing import Any

__all__ = ["TritonUnavailable", "build_kernels", "kernel_config", "spec_verify_triton"]

BLOCK_BYTES = 16384  # bytes of logits per program per loop step (4096 fp32 / 8192 fp16)
CHUNK = 16384        # vocabulary chunk: split-V statistics and the inverse-CDF search
MAX_G = 16
MAX_V = 262144       # the AOT plugin compiles for at most MAX_V / CHUNK chunks


class TritonUnavailable(ImportError):
    """Raised when the Triton path is used without triton (or torch for the launcher)."""


def kernel_config(logits_itemsize: int) -> dict[str, int]:
    """Compile-time sizes: BLOCK elements per loop step, G1_P2 token slots (>= MAX_G + 1).

    Both depend on the dtype only, so one compiled kernel serves every B, G and V.
    """
    return {"BLOCK": max(BLOCK_BYTES // logits_itemsize, 16), "G1_P2": _next_pow2(MAX_G + 1),
            "NUM_WARPS": 8}


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def build_kernels() -> dict[str, Any]:
    """Import the @triton.jit kernels on first use (so importing this module needs no triton)."""
    try:
        from . import _kernels
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise TritonUnavailable("the Triton SpecVerify kernel needs the `triton` package "
                                "(and a CUDA GPU); torch with CUDA brings it") from exc
    return {"chunk_stats": _kernels.chunk_stats_kernel, "spec_verify": _kernels.spec_verify_kernel}


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise TritonUnavailable("spec_verify_triton needs torch (CUDA tensors)") from exc
    return torch


def spec_verify_triton(target_logits, draft_ids, draft_probs, verify_lengths, temperature,
                       uniforms, *, split_v: bool | None = None):
    """Run SpecVerify on CUDA tensors (same dtypes and shapes as the ONNX op).

    `split_v` chooses the split-V statistics pre-pass; by default it is used when the batch
    has fewer rows than half the GPU's SMs. Returns (accepted [B], tokens [B, G+1]) int64.
    """
    torch = _torch()
    kernels = build_kernels()
    b, g1, v = target_logits.shape
    g = g1 - 1
    if not 1 <= g <= MAX_G:
        raise ValueError(f"spec_verify_triton supports 1 <= G <= {MAX_G}, got G={g}")
    if target_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"target_logits must be float32, float16 or bfloat16, got {target_logits.dtype}")
    expected = {"draft_ids": (draft_ids, (b, g), torch.int64),
                "draft_probs": (draft_probs, (b, g, v), torch.float32),
                "verify_lengths": (verify_lengths, (b,), torch.int64),
                "temperature": (temperature, (b,), torch.float32),
                "uniforms": (uniforms, (b, g1), torch.float32)}
    for name, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
    tensors = [t.contiguous() for t in (target_logits, draft_ids, draft_probs, verify_lengths,
                                        temperature, uniforms)]
    device = target_logits.device
    accepted = torch.empty(b, dtype=torch.int64, device=device)
    tokens = torch.empty((b, g1), dtype=torch.int64, device=device)
    cfg = kernel_config(target_logits.element_size())
    if split_v is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split_v = b * 2 <= sms and v > CHUNK
    nc = -(-v // CHUNK)
    if split_v:
        ws_m = torch.empty(b * g1 * nc, dtype=torch.float32, device=device)
        ws_s = torch.empty_like(ws_m)
        ws_arg = torch.empty(b * g1 * nc, dtype=torch.int32, device=device)
        kernels["chunk_stats"][(b * g1, nc)](tensors[0], tensors[3], tensors[4], ws_m, ws_s, ws_arg,
                                             g, v, nc, CHUNK=CHUNK, BLOCK=min(cfg["BLOCK"], CHUNK),
                                             num_warps=cfg["NUM_WARPS"])
    else:
        ws_m = ws_s = ws_arg = accepted  # never read when USE_WS is False
    kernels["spec_verify"][(b,)](*tensors, ws_m, ws_s, ws_arg, g, v, nc, accepted, tokens,
                                 BLOCK=min(cfg["BLOCK"], CHUNK), G1_P2=cfg["G1_P2"], CHUNK=CHUNK,
                                 NC_P2=_next_pow2(nc), USE_WS=split_v, num_warps=cfg["NUM_WARPS"])
    return accepted, tokens
