"""DeepSpec's DSpark objective, and a fused form of it for large vocabularies.

    loss = ce_w * CE + tv_w * L1 + conf_w * BCE(confidence, 1 - L1 / 2)

over block positions k with weights w_k = eval_mask * exp(-k / loss_decay_gamma), each term
sum(term * w) / denominator (DeepSpec `deepspec/modeling/dspark/loss.py`; L1 = sum_v |p - q|
= 2 TV between the drafter's p and the target's q).

On a CPU the [rows x V] work of that loss, not the model, is what a training step costs, and
autograd keeps several fp32 [rows, V] tensors per step. `head_terms` computes CE, L1 and the
greedy match of logits = h W_lm^T + e W2^T (every Markov head's bias is W2 of some rank-r
vector e) against the target's q in row chunks with fused kernels, keeping only the logits
(bf16 under autocast) for the backward pass, so fp32 temporaries are [chunk, V]. The target's
distribution of each position is computed once and shared by the (up to G) rows that predict
it. `dspark_loss` is the plain form on given logits; both feed `block_loss`, and tests check
the fused gradients against autograd through `dspark_loss`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# DeepSpec's DSpark objective (config/dspark/dspark_qwen3_4b.py).
CE_WEIGHT = 0.1
TV_WEIGHT = 0.9  # multiplies DeepSpec's "l1" = sum |p - q| = 2 TV
CONFIDENCE_WEIGHT = 1.0
LOSS_DECAY_GAMMA = 4.0
HEAD_CHUNK_ROWS = 1024  # rows of [chunk, V] fp32 live at once in `head_terms`


def position_weights(block_size: int, decay_gamma: float, device=None) -> torch.Tensor:
    """exp(-k / gamma) for k = 0..G-1 (DeepSpec's loss_decay_gamma; 0 disables decay)."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    if decay_gamma and decay_gamma > 0:
        return torch.exp(-k / float(decay_gamma))
    return torch.ones_like(k)


@dataclass
class LossStats:
    """Sums over rows (so micro-batches and evaluation chunks add up)."""

    ce: float = 0.0
    l1: float = 0.0
    confidence: float = 0.0
    weight: float = 0.0
    tv_sum: float = 0.0
    tokens: float = 0.0
    tau_prob: float = 0.0
    tau_greedy: float = 0.0
    blocks: float = 0.0
    accept_prob: list[float] = field(default_factory=list)
    accept_greedy: list[float] = field(default_factory=list)
    position_count: list[float] = field(default_factory=list)

    def add(self, other: "LossStats") -> None:
        for name in ("ce", "l1", "confidence", "weight", "tv_sum", "tokens", "tau_prob",
                     "tau_greedy", "blocks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("accept_prob", "accept_greedy", "position_count"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not mine:
                setattr(self, name, list(theirs))
            else:
                setattr(self, name, [a + b for a, b in zip(mine, theirs)])

    def summary(self, weights: tuple[float, float, float] | None = None) -> dict:
        w = max(self.weight, 1e-12)
        out = {
            "ce": self.ce / w,
            "l1": self.l1 / w,
            "confidence_bce": self.confidence / w,
            "tv": self.tv_sum / max(self.tokens, 1e-12),
            "tau_prob": self.tau_prob / max(self.blocks, 1e-12),
            "tau_greedy": self.tau_greedy / max(self.blocks, 1e-12),
            "accept_rate_per_position": [a / max(c, 1e-12) for a, c in
                                         zip(self.accept_prob, self.position_count)],
            "greedy_match_per_position": [a / max(c, 1e-12) for a, c in
                                          zip(self.accept_greedy, self.position_count)],
            "blocks": int(self.blocks),
        }
        if weights is not None:
            ce_w, tv_w, conf_w = weights
            out["loss"] = ce_w * out["ce"] + tv_w * out["l1"] + conf_w * out["confidence_bce"]
        return out


def block_loss(
    ce: torch.Tensor,
    l1: torch.Tensor,
    match: torch.Tensor,
    eval_mask: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    *,
    ce_weight: float = CE_WEIGHT,
    tv_weight: float = TV_WEIGHT,
    confidence_weight: float = CONFIDENCE_WEIGHT,
    loss_decay_gamma: float = LOSS_DECAY_GAMMA,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The weighted objective from per-position terms [R, G] (CE, L1, greedy match), and the
    metric sums. `denominator` defaults to sum(w) + 1e-6 (pass the whole batch's to split it
    into parts). Masked-out positions may hold any finite value."""
    gamma = ce.shape[1]
    mask = eval_mask.float()
    w = mask * position_weights(gamma, loss_decay_gamma, ce.device)[None, :]
    den = w.sum() + 1e-6 if denominator is None else denominator
    ce, l1 = ce * mask, l1 * mask
    accept = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    loss = ce_weight * (ce * w).sum() / den
    if tv_weight > 0:
        loss = loss + tv_weight * (l1 * w).sum() / den
    conf_sum = torch.zeros((), device=ce.device)
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept,
                                                 reduction="none")
        conf_sum = (bce * w).sum()
        if confidence_weight > 0:
            loss = loss + confidence_weight * conf_sum / den
    with torch.no_grad():
        match = match & eval_mask
        block_valid = eval_mask[:, 0]
        prob_prefix = (accept * mask).cumprod(dim=-1)
        greedy_prefix = match.float().cumprod(dim=-1)
        stats = LossStats(
            ce=float((ce.detach() * w).sum()),
            l1=float((l1.detach() * w).sum()),
            confidence=float(conf_sum.detach()),
            weight=float(w.sum()),
            tv_sum=float((0.5 * l1.detach() * mask).sum()),
            tokens=float(mask.sum()),
            tau_prob=float(((prob_prefix.sum(-1) + 1.0) * block_valid).sum()),
            tau_greedy=float(((greedy_prefix.sum(-1) + 1.0) * block_valid).sum()),
            blocks=float(block_valid.sum()),
            accept_prob=(accept * mask).sum(0).tolist(),
            accept_greedy=(greedy_prefix * mask).sum(0).tolist(),
            position_count=mask.sum(0).tolist(),
        )
    return loss, stats


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    eval_mask: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    **weights,
) -> tuple[torch.Tensor, LossStats]:
    """DeepSpec's DSpark loss for [R, G, V] logits; returns (loss, sums for metrics)."""
    logits = draft_logits.float()
    log_p = torch.log_softmax(logits, dim=-1)
    ce = -log_p.gather(-1, labels[..., None]).squeeze(-1)
    with torch.no_grad():
        q = torch.softmax(target_logits.float(), dim=-1)
        match = logits.argmax(-1) == target_logits.argmax(-1)
    if weights.get("tv_weight", TV_WEIGHT) > 0:
        l1 = (log_p.exp() - q).abs().sum(-1)
    else:
        with torch.no_grad():
            l1 = (log_p.exp() - q).abs().sum(-1)
    return block_loss(ce, l1, match, eval_mask, confidence_logits, **weights)


@dataclass
class TargetDistributions:
    """The target's distribution q at U positions, over the tokens the drafter scores."""

    probs: torch.Tensor  # [U, Vd] fp32: q on the scored tokens
    top: torch.Tensor  # [U] index of argmax q among them (-1: the argmax is not scored)
    rest: torch.Tensor  # [U] fp32: q's mass on tokens the drafter does not score


def _forward_terms(z, target_probs, target_rest, target_index, labels):
    """Per row of z [n, Vd]: (CE, L1 against q = target_probs[target_index], logsumexp,
    argmax). The drafter puts no mass outside its tokens, so L1 adds q's mass there."""
    z = z.float()
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(-1, labels[:, None]).squeeze(-1)
    l1 = (torch.exp(z - lse[:, None]) - target_probs[target_index]).abs().sum(-1)
    return ce, l1 + target_rest[target_index], lse, z.argmax(-1)


def _logit_grad(z, target_probs, target_index, labels, lse, grad_ce, grad_l1,
                dtype: torch.dtype):
    """d(grad_ce . CE + grad_l1 . L1)/dz: p (g_l1 (s - <p, s>) + g_ce) - g_ce onehot(label),
    s = sign(p - q)."""
    p = torch.exp(z.float() - lse[:, None])
    sign = torch.sign(p - target_probs[target_index])
    inner = (p * sign).sum(-1, keepdim=True)
    dz = p * (grad_l1[:, None] * (sign - inner) + grad_ce[:, None])
    return dz.scatter_add(1, labels[:, None], -grad_ce[:, None]).to(dtype)


_COMPILED: dict[str, Callable] = {}


def _kernel(name: str, compiled: bool) -> Callable:
    """The eager function, or its torch.compile'd form (one fused loop per reduction instead
    of a pass per op over [chunk, V]; compiled once per process)."""
    eager = {"forward": _forward_terms, "grad": _logit_grad, "target": _target_terms}[name]
    if not compiled:
        return eager
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(eager, dynamic=True)
    return _COMPILED[name]


class _HeadTerms(torch.autograd.Function):
    """Per-row (CE, L1, greedy match) of logits [x, e] @ [W_lm, W2]^T against given target
    distributions, computed and differentiated chunk by chunk (see the module doc)."""

    @staticmethod
    def forward(ctx, hidden, w2_input, lm_weight, w2_weight, target_probs, target_rest,
                target_index, target_top, labels, chunk, compiled):
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        l1, lse = torch.empty_like(ce), torch.empty_like(ce)
        match = torch.empty(n, dtype=torch.bool, device=hidden.device)
        weight, mm = _joint_weight(lm_weight, w2_weight, hidden.dtype)
        logits = torch.empty(n, weight.shape[0], dtype=mm, device=hidden.device)
        terms = _kernel("forward", compiled)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                z = torch.matmul(_joint_input(hidden, w2_input, lo, hi, mm), weight.t(),
                                 out=logits[lo:hi])
                index = target_index[lo:hi]
                ce[lo:hi], l1[lo:hi], lse[lo:hi], top = terms(z, target_probs, target_rest,
                                                              index, labels[lo:hi])
                match[lo:hi] = top == target_top[index]
        # Keeping the logits (in the matmul dtype) spares the backward pass a third matmul.
        ctx.save_for_backward(hidden, w2_input, lm_weight, w2_weight, target_probs,
                              target_index, labels, lse, logits)
        ctx.chunk, ctx.compiled = chunk, compiled
        ctx.weight, ctx.mm = weight, mm  # [W_lm, W2] once per step, not again in backward
        ctx.mark_non_differentiable(match)
        return ce, l1, match

    @staticmethod
    def backward(ctx, grad_ce, grad_l1, _grad_match):
        hidden, w2_input, lm_weight, w2_weight, target_probs, target_index, labels, lse, \
            logits = ctx.saved_tensors
        need = ctx.needs_input_grad
        weight, mm = ctx.weight, ctx.mm
        width = hidden.shape[1]  # d: the split of d_input into hidden and Markov parts
        d_input = torch.empty(hidden.shape[0], weight.shape[1], dtype=torch.float32,
                              device=hidden.device)
        d_lm = torch.zeros(lm_weight.shape, dtype=torch.float32, device=hidden.device) \
            if need[2] else None
        d_w2 = torch.zeros(w2_weight.shape, dtype=torch.float32, device=hidden.device) \
            if w2_weight is not None and need[3] else None
        grad = _kernel("grad", ctx.compiled)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], ctx.chunk):
                hi = min(lo + ctx.chunk, hidden.shape[0])
                dz = grad(logits[lo:hi], target_probs, target_index[lo:hi], labels[lo:hi],
                          lse[lo:hi], grad_ce[lo:hi].float(), grad_l1[lo:hi].float(), mm)
                d_input[lo:hi] = (dz @ weight).float()
                if d_lm is not None:
                    d_lm += (dz.t() @ hidden[lo:hi].to(mm)).float()
                if d_w2 is not None:
                    d_w2 += (dz.t() @ w2_input[lo:hi].to(mm)).float()
        d_hidden = d_input[:, :width].to(hidden.dtype) if need[0] else None
        d_w2_input = d_input[:, width:].to(w2_input.dtype) \
            if w2_input is not None and need[1] else None
        return (d_hidden, d_w2_input, None if d_lm is None else d_lm.to(lm_weight.dtype),
                None if d_w2 is None else d_w2.to(w2_weight.dtype),
                None, None, None, None, None, None, None)


def _joint_weight(lm_weight: torch.Tensor, w2_weight: torch.Tensor | None,
                  input_dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    """[W_lm, W2] [V, d + r] in the matmul dtype: bf16 when the inputs or lm_head are bf16
    (autocast), fp32 otherwise."""
    mm = torch.bfloat16 if torch.bfloat16 in (input_dtype, lm_weight.dtype) else torch.float32
    parts = [lm_weight] + ([] if w2_weight is None else [w2_weight])
    return torch.cat([part.to(mm) for part in parts], dim=1), mm


def _joint_input(hidden, w2_input, lo: int, hi: int, mm: torch.dtype) -> torch.Tensor:
    parts = [hidden[lo:hi]] + ([] if w2_input is None else [w2_input[lo:hi]])
    return torch.cat([part.to(mm) for part in parts], dim=1)


def _target_terms(logits: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q on the first `kept` tokens (softmax over all of them) and argmax q, per row."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return torch.exp(z[:, :kept] - lse), z.argmax(-1)


class TargetHead:
    """The target's frozen lm_head, cast once to the matmul dtype, with the scored tokens
    first so that q on them is one contiguous slice of the logits (no gather over [U, V]).

    It also holds, built once, what the drafter's side needs for a draft vocabulary: the
    lm_head rows of the scored tokens (`draft_lm_weight`, in lm_head's own dtype) and the map
    from token id to scored index, -1 outside (`local_index`)."""

    def __init__(self, lm_weight: torch.Tensor, vocab: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        self.vocab = vocab
        weight = lm_weight.detach()
        self.draft_lm_weight = weight
        self.local_index = None
        if vocab is not None:
            self.draft_lm_weight = weight[vocab]
            self.local_index = torch.full((weight.shape[0],), -1, dtype=torch.long,
                                          device=weight.device)
            self.local_index[vocab] = torch.arange(vocab.numel(), device=weight.device)
            others = (self.local_index < 0).nonzero().squeeze(1)
            weight = weight[torch.cat([vocab, others])]
        self.weight = weight.to(dtype or weight.dtype).contiguous()
        self.kept = weight.shape[0] if vocab is None else vocab.numel()

    @torch.no_grad()
    def distributions(self, hidden: torch.Tensor, chunk: int = HEAD_CHUNK_ROWS,
                      compiled: bool = False) -> TargetDistributions:
        """softmax(hidden @ W^T) over all V tokens, kept on the scored ones, chunk by chunk."""
        rows = hidden.shape[0]
        probs = torch.empty(rows, self.kept, dtype=torch.float32, device=hidden.device)
        top = torch.empty(rows, dtype=torch.long, device=hidden.device)
        terms = _kernel("target", compiled)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, rows, chunk):
                logits = hidden[lo:lo + chunk].to(self.weight.dtype) @ self.weight.t()
                probs[lo:lo + chunk], top[lo:lo + chunk] = terms(logits, self.kept)
        top = torch.where(top < self.kept, top, -1)  # the argmax is not a scored token
        rest = (1.0 - probs.sum(-1)).clamp(min=0.0) if self.vocab is not None \
            else torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        return TargetDistributions(probs, top, rest)


def head_terms(
    hidden: torch.Tensor,
    w2_input: torch.Tensor | None,
    lm_weight: torch.Tensor,
    w2_weight: torch.Tensor | None,
    target: TargetDistributions,
    target_index: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk: int = HEAD_CHUNK_ROWS,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE [N], L1 [N], greedy match [N]) for N rows.

    hidden [N, d] are the drafter's final hidden states, w2_input [N, r] (or None without a
    Markov head) the Markov head's rank-r vectors, so the draft logits are
    hidden @ lm_weight^T + w2_input @ w2_weight^T, over the rows of those [Vd, *] weights
    (all V tokens, or a draft vocabulary's). Row i is compared with the target distribution
    target_index[i] of `target` (`target_distributions` over the same tokens), so rows that
    predict the same position share one; labels index the scored tokens. `compiled` fuses
    the per-chunk elementwise work with torch.compile (worth it for large Vd).
    """
    return _HeadTerms.apply(hidden, w2_input, lm_weight, w2_weight, target.probs, target.rest,
                            target_index, target.top, labels, chunk, compiled)
