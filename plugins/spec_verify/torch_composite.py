"""SpecVerify as plain torch ops (the same steps as the ONNX function body).

This is what a framework gets without a custom kernel: every row computes every position's
softmax and argmax, the residual and a full cumsum. gpu_check.py times it against the Triton
kernel; it also runs on CPU, where the tests compare it with the numpy reference.
"""
from __future__ import annotations

import torch

from .reference import RESIDUAL_EPS

__all__ = ["spec_verify_torch"]


def spec_verify_torch(target_logits: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor,
                      verify_lengths: torch.Tensor, temperature: torch.Tensor,
                      uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (accepted [B], tokens [B, G+1]) int64; inputs as in spec.md."""
    b, g1, v = target_logits.shape
    g = g1 - 1
    x = target_logits.float()
    sampling = temperature > 0
    t_safe = torch.where(sampling, temperature, torch.ones_like(temperature))
    p = torch.softmax(x / t_safe[:, None, None], dim=-1)
    argmax = torch.argmax(x, dim=-1)  # first index of the maximum, as in NumPy and ONNX

    ids = draft_ids[:, :, None]
    p_x = torch.gather(p[:, :g], 2, ids)[..., 0]
    q_x = torch.gather(draft_probs, 2, ids)[..., 0]
    accept = torch.where(sampling[:, None], uniforms[:, :g] * q_x < p_x, draft_ids == argmax[:, :g])
    positions = torch.arange(g, device=x.device)
    ok = accept & (positions[None, :] < verify_lengths[:, None])
    a = torch.cumprod(ok.to(torch.int64), dim=1).sum(dim=1)                          # [B]

    rows = torch.arange(b, device=x.device)
    p_a = p[rows, a]                                                                 # [B, V]
    residual = (p_a - draft_probs[rows, torch.clamp(a, max=g - 1)]).clamp_min(0.0)
    use_residual = (a < verify_lengths) & (residual.sum(dim=-1) > RESIDUAL_EPS)
    weights = torch.where(use_residual[:, None], residual, p_a)
    cdf = torch.cumsum(weights, dim=-1)
    threshold = uniforms[:, g:] * cdf[:, -1:]
    sampled = torch.clamp((cdf <= threshold).sum(dim=-1), max=v - 1)
    token = torch.where(sampling, sampled, argmax[rows, a])

    slots = torch.arange(g1, device=x.device)[None, :]
    drafts = torch.cat([draft_ids, torch.full_like(draft_ids[:, :1], -1)], dim=1)
    tail = torch.where(slots == a[:, None], token[:, None], torch.full_like(drafts, -1))
    return a, torch.where(slots < a[:, None], drafts, tail)
