"""NumPy reference of the SpecVerify op: the definition every backend is tested against.

Torch-free on purpose: the runtime (numpy + onnxruntime/tensorrt) and the tests use it as the
ground truth. The arithmetic follows spec.md step by step in float32, so the ONNX function body
and the kernels can be compared with it token for token.
"""
from __future__ import annotations

import numpy as np

RESIDUAL_EPS = 1e-8  # DeepSpec's fallback threshold: a residual with no mass samples from p
LOGITS_DTYPES = ("float32", "float16", "bfloat16")

__all__ = ["LOGITS_DTYPES", "RESIDUAL_EPS", "inverse_cdf_sample", "softmax", "spec_verify",
           "validate_inputs"]


def inverse_cdf_sample(weights: np.ndarray, uniforms: np.ndarray | float) -> np.ndarray:
    """Sample the last axis of non-negative `weights` with one uniform per leading index.

    The shared rule (docs/graphs.md): cdf = cumsum(w) in float32, token = count(cdf <= u * cdf[-1]),
    clamped to V - 1. Weights need not be normalised; the clamp covers u * cdf[-1] == cdf[-1].
    """
    w = np.asarray(weights, dtype=np.float32)
    u = np.asarray(uniforms, dtype=np.float32)
    cdf = np.cumsum(w, axis=-1, dtype=np.float32)
    threshold = u * cdf[..., -1]
    count = np.count_nonzero(cdf <= threshold[..., None], axis=-1)
    return np.minimum(count, w.shape[-1] - 1).astype(np.int64)


def softmax(x: np.ndarray) -> np.ndarray:
    """Float32 softmax over the last axis (max-subtracted, so large logits cannot overflow)."""
    z = np.asarray(x, dtype=np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def _check(name: str, array: np.ndarray, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype.name not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {array.dtype.name}")
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")


def validate_inputs(target_logits: np.ndarray, draft_ids: np.ndarray, draft_probs: np.ndarray,
                    verify_lengths: np.ndarray, temperature: np.ndarray,
                    uniforms: np.ndarray) -> tuple[int, int, int]:
    """Check shapes, dtypes and value ranges; return (B, G, V) or raise ValueError naming the input."""
    if not isinstance(target_logits, np.ndarray) or target_logits.ndim != 3:
        raise ValueError("target_logits must be a rank-3 array [B, G+1, V], got "
                         f"{getattr(target_logits, 'shape', type(target_logits).__name__)}")
    b, g1, v = target_logits.shape
    g = g1 - 1
    if g < 1 or v < 1 or b < 1:
        raise ValueError(f"target_logits must have B >= 1, G+1 >= 2 and V >= 1, got {target_logits.shape}")
    _check("target_logits", target_logits, (b, g1, v), LOGITS_DTYPES)
    _check("draft_ids", draft_ids, (b, g), ("int64",))
    _check("draft_probs", draft_probs, (b, g, v), ("float32",))
    _check("verify_lengths", verify_lengths, (b,), ("int64",))
    _check("temperature", temperature, (b,), ("float32",))
    _check("uniforms", uniforms, (b, g1), ("float32",))
    if np.any((draft_ids < 0) | (draft_ids >= v)):
        raise ValueError(f"draft_ids must lie in [0, V={v})")
    if np.any((verify_lengths < 0) | (verify_lengths > g)):
        raise ValueError(f"verify_lengths must lie in [0, G={g}]")
    if not np.all((uniforms >= 0) & (uniforms < 1)):
        raise ValueError("uniforms must lie in [0, 1)")
    if not np.all(np.isfinite(temperature)):
        raise ValueError("temperature must be finite")
    return b, g, v


def spec_verify(target_logits: np.ndarray, draft_ids: np.ndarray, draft_probs: np.ndarray,
                verify_lengths: np.ndarray, temperature: np.ndarray,
                uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lossless speculative verification; returns (accepted [B] int64, tokens [B, G+1] int64).

    Greedy rows (temperature <= 0) accept while the draft equals the target's first argmax and
    emit the target's argmax at the first mismatch (or the bonus position). Sampling rows accept
    draft x at k iff u_k * q_k(x) < p_k(x) and draw the correction from max(0, p - q) (p when that
    has no mass) or the bonus from p, both with uniforms[:, G] by the inverse-CDF rule.
    """
    b_size, g, _ = validate_inputs(target_logits, draft_ids, draft_probs, verify_lengths,
                                   temperature, uniforms)
    x = target_logits.astype(np.float32)
    accepted = np.zeros(b_size, dtype=np.int64)
    tokens = np.full((b_size, g + 1), -1, dtype=np.int64)
    for b in range(b_size):
        length = int(verify_lengths[b])
        drafts = draft_ids[b]
        t = temperature[b]
        a = 0
        if t > 0:
            p = softmax(x[b] / t)
            while a < length and uniforms[b, a] * draft_probs[b, a, drafts[a]] < p[a, drafts[a]]:
                a += 1
            weights = p[a]
            if a < length:
                residual = np.maximum(p[a] - draft_probs[b, a], np.float32(0))
                if residual.sum(dtype=np.float32) > RESIDUAL_EPS:
                    weights = residual
            token = int(inverse_cdf_sample(weights, uniforms[b, g]))
        else:
            target = np.argmax(x[b], axis=-1)  # first index of the maximum
            while a < length and drafts[a] == target[a]:
                a += 1
            token = int(target[a])
        accepted[b] = a
        tokens[b, :a] = drafts[:a]
        tokens[b, a] = token
    return accepted, tokens
