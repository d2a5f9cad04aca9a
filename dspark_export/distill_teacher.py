"""The target's side of a distillation step: context features, final hidden states, and the
tokens the drafter is trained to score.

The target is frozen, so its teacher-forced outputs on the training data never change. When
they fit in `FEATURE_CACHE_BYTES` they are computed once (`FeatureCache`) and every later
epoch reads them instead of running the target again; on a CPU that pass costs about as much
as the drafter's own step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dspark_export.distill_data import DistillData
from dspark_export.distill_loss import TargetHead

FEATURE_CACHE_BYTES = 8 << 30  # the cache is used when it fits here
CACHE_BATCH_TOKENS = 8192  # tokens per teacher-forced pass while filling the cache


@torch.no_grad()
def target_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [S, L, m*d], final normed hidden [S, L, d]) of a teacher-forced pass.

    features = concat(hidden_states[i + 1]) (hidden_states[0], the embeddings, for -1), the
    raw decoder-layer outputs DeepSpec's `extract_context_feature` takes.
    """
    out = model.model(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=True, use_cache=False)
    hidden_states = out.hidden_states
    features = torch.cat([hidden_states[0 if i == -1 else i + 1] for i in layer_ids], dim=-1)
    return features, out.last_hidden_state


class FeatureCache:
    """Teacher-forced features and final hidden states of every sequence, token-major."""

    def __init__(self, features: torch.Tensor, last: torch.Tensor, offsets: np.ndarray):
        self.features, self.last, self.offsets = features, last, offsets

    @staticmethod
    def nbytes(data: DistillData, feature_dim: int, hidden_dim: int, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return int(data.tokens.size) * (feature_dim + hidden_dim) * size

    @classmethod
    def build(cls, model, data: DistillData, layer_ids: list[int], amp: Callable,
              dtype: torch.dtype, on_progress: Callable[[int, int], None] | None = None
              ) -> FeatureCache:
        """Run the target over all sequences, in length-sorted batches of similar size, and
        keep the outputs in `dtype` (the compute dtype: every consumer is a matmul that casts
        to it anyway, while autocast leaves the residual stream in fp32)."""
        device = next(model.parameters()).device
        lengths = data.lengths()
        order = np.argsort(lengths, kind="stable")
        features = last = None
        done, start = 0, 0
        while start < len(order):
            width = int(lengths[order[min(len(order) - 1, start)]])
            count = max(1, CACHE_BATCH_TOKENS // max(width, 1))
            group = order[start:start + count]
            width = int(lengths[group].max())
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                seq = torch.from_numpy(data.sequence(int(i)).astype(np.int64))
                ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            with amp():
                feats, final = target_features(model, ids.to(device), mask.to(device),
                                               layer_ids)
            if features is None:
                total = int(data.tokens.size)
                features = torch.empty(total, feats.shape[-1], dtype=dtype, device=device)
                last = torch.empty(total, final.shape[-1], dtype=dtype, device=device)
            for row, i in enumerate(group):
                lo, hi = int(data.offsets[i]), int(data.offsets[i + 1])
                features[lo:hi], last[lo:hi] = feats[row, :hi - lo], final[row, :hi - lo]
            start += len(group)
            done += int(lengths[group].sum())
            if on_progress:
                on_progress(done, int(data.tokens.size))
        return cls(features, last, np.asarray(data.offsets))

    def batch(self, indices: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([S, width, F], [S, width, d]) for these sequences, zero past each one's end."""
        features = self.features.new_zeros(len(indices), width, self.features.shape[1])
        last = self.last.new_zeros(len(indices), width, self.last.shape[1])
        for row, i in enumerate(indices):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            features[row, :hi - lo], last[row, :hi - lo] = self.features[lo:hi], self.last[lo:hi]
        return features, last


@dataclass
class Teacher:
    """The frozen target, its feature taps, an optional `FeatureCache`, and its lm_head over
    the tokens the drafter scores (all, or a draft vocabulary: models/draft_vocab.py)."""

    model: Any
    layer_ids: list[int]
    head: TargetHead
    cache: FeatureCache | None = None

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, final hidden) of the batch of sequences `indices` of the data."""
        if self.cache is not None:
            return self.cache.batch(indices, input_ids.shape[1])
        return target_features(self.model, input_ids, attention_mask, self.layer_ids)
