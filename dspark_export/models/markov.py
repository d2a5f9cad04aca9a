"""DSpark's sequential stage: Markov heads, the confidence head and inverse-CDF sampling.

Parameter names follow DeepSpec (`markov_w1`, `markov_w2`, `gate_proj`, `joint_proj`,
`proj`) so checkpoints load as they are. Every head exposes one `transition_input` with the
same signature and an explicit recurrent state, so the sampling loop in `DSparkDrafter` is a plain
Python loop over the block that torch.onnx unrolls without data-dependent branches.
"""
from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")

# Confidence logit reported when a drafter has no confidence head: sigmoid(30) == 1.0 in fp32,
# so a scheduler treats every position as certain (plain DFlash behaviour).
NO_CONFIDENCE_LOGIT = 30.0


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample the last axis of `probs` with one uniform per row (docs/graphs.md rule).

    token = #{i : cdf[i] <= u * cdf[-1]}, clamped to V - 1. Scaling by cdf[-1] instead of
    renormalising keeps the rule identical across backends whatever the rounding of the sum.
    """
    cdf = torch.cumsum(probs.float(), dim=-1)
    threshold = uniforms.float().unsqueeze(-1) * cdf[..., -1:]
    count = (cdf <= threshold).to(torch.int64).sum(dim=-1)
    return torch.clamp(count, max=probs.shape[-1] - 1)


class VanillaMarkovHead(nn.Module):
    """B(x_{k-1}) = W2 W1[x_{k-1}]: a rank-r token-to-token transition bias."""

    def __init__(self, vocab_size: int, markov_rank: int) -> None:
        super().__init__()
        self.markov_rank = markov_rank
        self.markov_w1 = nn.Embedding(vocab_size, markov_rank)
        self.markov_w2 = nn.Linear(markov_rank, vocab_size, bias=False)

    def prev_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """W1[x]; also the Markov half of the confidence head's input."""
        return self.markov_w1(token_ids)

    def transition_input(
        self, prev_emb: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(e [B, r], next state): the bias is markov_w2(e). Memoryless heads pass the state
        through. Every head's bias is W2 of some r-vector, so training folds W2 into the
        lm_head matmul (distill_loss.py) and a draft vocabulary keeps only W2's rows."""
        return prev_emb, state


class GatedMarkovHead(VanillaMarkovHead):
    """The embedding is gated by sigmoid(gate_proj([h_k; W1[x_{k-1}]])) before W2."""

    def __init__(self, vocab_size: int, markov_rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, markov_rank)
        self.gate_proj = nn.Linear(hidden_size + markov_rank, markov_rank)

    def transition_input(
        self, prev_emb: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, prev_emb], dim=-1)))
        return gate * prev_emb, state


class RNNMarkovHead(VanillaMarkovHead):
    """GRU-like state s over [s; W1[x_{k-1}]; h_k]: position k sees the whole drafted prefix."""

    def __init__(self, vocab_size: int, markov_rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, markov_rank)
        self.joint_proj = nn.Linear(2 * markov_rank + hidden_size, 3 * markov_rank)

    def transition_input(
        self, prev_emb: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.joint_proj(torch.cat([state, prev_emb, hidden], dim=-1))
        gate_raw, candidate_raw, output_raw = proj.chunk(3, dim=-1)
        gate = torch.sigmoid(gate_raw)
        new_state = gate * state + (1.0 - gate) * torch.tanh(candidate_raw)
        return torch.tanh(output_raw), new_state


def build_markov_head(
    head_type: str, vocab_size: int, markov_rank: int, hidden_size: int
) -> VanillaMarkovHead | None:
    """The head DeepSpec builds for (markov_head_type, markov_rank); None when rank is 0."""
    if markov_rank == 0:
        return None
    if head_type == "vanilla":
        return VanillaMarkovHead(vocab_size, markov_rank)
    if head_type == "gated":
        return GatedMarkovHead(vocab_size, markov_rank, hidden_size)
    if head_type == "rnn":
        return RNNMarkovHead(vocab_size, markov_rank, hidden_size)
    raise ValueError(f"markov_head_type {head_type!r} is not one of {MARKOV_HEAD_TYPES}")


class ConfidenceHead(nn.Module):
    """DeepSpec's AcceptRatePredictor: one linear unit giving a survival logit per position."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


def select_token(
    logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row: greedy where temperature <= 0, else inverse-CDF sampling.

    Returns (ids [B] int64, probs [B, V] fp32). Both branches are computed and selected with
    `where`, so one graph serves a batch that mixes greedy and sampled rows.
    """
    logits = logits.float()
    greedy = temperature <= 0
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    sampled_probs = torch.softmax(logits / safe_temperature.unsqueeze(-1), dim=-1)
    sampled_ids = inverse_cdf_sample(sampled_probs, uniforms)
    greedy_ids = torch.argmax(logits, dim=-1)
    greedy_probs = torch.nn.functional.one_hot(greedy_ids, logits.shape[-1]).to(torch.float32)
    ids = torch.where(greedy, greedy_ids, sampled_ids)
    probs = torch.where(greedy.unsqueeze(-1), greedy_probs, sampled_probs)
    return ids, probs
