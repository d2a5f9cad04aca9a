"""`dspark-export distill`: train a DSpark (or DFlash) drafter on the target's own generations.

The objective is DeepSpec's (`deepspec/modeling/dspark/loss.py`, config `dspark_qwen3_4b.py`):

    loss = 0.1 * CE + 0.9 * L1 + 1.0 * BCE(confidence, 1 - TV)

over the block positions k = 0..G-1 of every sampled anchor, each term a weighted mean with
weights w_k = exp(-k / 4.0) (loss_decay_gamma = 4) times the evaluation mask. L1 is DeepSpec's
"l1" term, sum_v |p_draft - p_target| = 2 TV, and the confidence target is its accept rate
1 - TV (detached, clamped to [0, 1]). The DFlash ablation in DeepSpec (`dflash_qwen3_4b.py`) is
markov_rank 0, no confidence head and CE alone (ce 1.0, l1 0.0).

Each step follows DeepSpec's sampler and masks, computed through the modules of
`DSparkDrafter` that decode, so what is trained is exactly what decodes:

- a teacher-forced target pass over prompt + response gives the context features (concatenated
  hidden_states[i + 1] for the tapped layers) and the target's logits at every position;
- anchors are drawn uniformly without replacement among positions a with loss_mask[a] and
  loss_mask[a + 1] (response tokens), up to `anchors` per sequence;
- the context K/V of a sequence is computed once (`context_kv`) and shared by its anchor rows;
  each block sees the context < its anchor (as DeepSpec's training mask and the decoder's
  cache do) and itself, block = [anchor, MASK x (G-1)] at positions anchor..anchor+G-1; all
  blocks of a sequence run in one packed pass (`packed_block_hidden`, tested equal to
  `backbone` per block);
- labels are the tokens at anchor+1..anchor+G; the evaluation mask is the contiguous prefix of
  in-range response labels; the Markov head and the confidence head see the TRUE previous
  tokens [anchor, labels[:-1]] (teacher forcing).

Embeddings and lm_head are the target's, frozen, and are not saved. AdamW (DeepSpec: lr 6e-4,
no weight decay), linear warmup over 4 % then cosine to zero, gradient clipping at 1.0, bf16
autocast on CUDA and on CPUs with AMX (fp32 on other CPUs). The vocabulary-wide part of the
loss runs fused and chunked (distill_loss.py), and all blocks of a sequence share one packed
backbone pass. Checkpoints (trainable weights, optimizer, step, RNG) go to
`out_dir/.checkpoints` and a rerun resumes from the newest; the final drafter is saved in
DeepSpec format in fp16 with a `training.json`, plus `token_counts.json` (how often the
target emitted each token, for a draft vocabulary: models/draft_vocab.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dspark_export.distill_data import (
    DistillData,
    DistillDataError,
    Prompt,
    build_corpus,
    check_mix,
    corpus_digest,
    generate_responses,
    load_data,
    load_prompts,
    target_signature,
)
from dspark_export.models.draft import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    DSparkConfig,
    DSparkDrafter,
    default_target_layer_ids,
    make_random_drafter,
    save_drafter,
)
from dspark_export.distill_loss import (
    CE_WEIGHT,
    CONFIDENCE_WEIGHT,
    LOSS_DECAY_GAMMA,
    TV_WEIGHT,
    LossStats,
    block_loss,
    head_terms,
    TargetHead,
    position_weights,
)
from dspark_export.distill_teacher import FEATURE_CACHE_BYTES, FeatureCache, Teacher, target_features
from dspark_export.models.draft_vocab import coverage, select_draft_vocab, write_token_counts
from dspark_export.models.markov import MARKOV_HEAD_TYPES, RNNMarkovHead

# DeepSpec's optimiser (config/dspark/dspark_qwen3_4b.py); the objective is in distill_loss.py.
LEARNING_RATE = 6e-4
WARMUP_RATIO = 0.04
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
TRAINING_FORMAT = "dspark-distill/1"
# From this vocabulary size on, the loss's per-chunk elementwise work is torch.compile'd: the
# one-off compile (about a minute) is repaid within a few steps; tiny test models stay eager.
COMPILE_MIN_VOCAB = 8192
CHECKPOINT_DIR = ".checkpoints"
TRAINING_JSON = "training.json"
# The reference target's shape; a target that matches gets REFERENCE_LAYER_IDS.
_REFERENCE_SHAPE = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}


class DistillError(ValueError):
    """Arguments, folders or data that a distillation run cannot use."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class DistillSettings:
    """Everything that defines a run (recorded in training.json, checked on resume)."""

    block_size: int = 7
    num_layers: int = 1
    markov_rank: int = 64
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    target_layer_ids: list[int] | None = None
    tokens: int = 200_000
    max_response_tokens: int = 256
    max_prompt_tokens: int = 512
    epochs: float | None = None
    steps: int | None = None
    lr: float = LEARNING_RATE
    warmup_ratio: float = WARMUP_RATIO
    weight_decay: float = WEIGHT_DECAY
    max_grad_norm: float = MAX_GRAD_NORM
    batch_size: int | None = None  # sequences per step
    anchors: int | None = None  # anchors per sequence
    ce_weight: float = CE_WEIGHT
    tv_weight: float = TV_WEIGHT
    confidence_weight: float = CONFIDENCE_WEIGHT
    loss_decay_gamma: float = LOSS_DECAY_GAMMA
    seed: int = 0
    heldout_fraction: float = 0.03
    checkpoint_every: int = 200
    draft_vocab: int = 0  # > 0: train for a draft vocabulary of that many tokens
    init_from: str | None = None  # a drafter folder whose weights training starts from

    def validate(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DistillError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "num_layers", "tokens", "max_response_tokens",
                     "max_prompt_tokens", "checkpoint_every"):
            positive_int(name, getattr(self, name))
        for name in ("steps", "batch_size", "anchors"):
            positive_int(name, getattr(self, name), allow_none=True)
        if self.block_size < 2:
            raise DistillError(f"block_size must be >= 2, got {self.block_size}")
        if isinstance(self.markov_rank, bool) or not isinstance(self.markov_rank, int) \
                or self.markov_rank < 0:
            raise DistillError(f"markov_rank must be an integer >= 0, got {self.markov_rank!r}")
        if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise DistillError(
                f"markov_head_type {self.markov_head_type!r} is not one of "
                f"{', '.join(MARKOV_HEAD_TYPES)}"
            )
        if self.epochs is not None and not (self.epochs > 0):
            raise DistillError(f"epochs must be > 0, got {self.epochs!r}")
        if not (self.lr > 0):
            raise DistillError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise DistillError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("ce_weight", "tv_weight", "confidence_weight", "weight_decay",
                     "max_grad_norm", "loss_decay_gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                    or not math.isfinite(value):
                raise DistillError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.ce_weight == 0 and self.tv_weight == 0:
            raise DistillError("ce_weight and tv_weight are both 0: nothing trains the drafter")
        if self.confidence_head and self.confidence_weight == 0:
            raise DistillError(
                "confidence_head is on but confidence_weight is 0 (DeepSpec enables the head "
                "exactly when its loss weight is > 0)"
            )
        if not 0 <= self.heldout_fraction < 1:
            raise DistillError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) \
                or self.draft_vocab < 0:
            raise DistillError(f"draft_vocab must be an integer >= 0, got {self.draft_vocab!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise DistillError(f"device must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DistillError("device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX), several times fp32's speed."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probe: assume not
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 autocast on CUDA and on AMX CPUs, fp32 on other CPUs by default."""
    if dtype is None or dtype == "auto":
        fast = device.type == "cuda" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, torch.bfloat16: torch.bfloat16,
             torch.float32: torch.float32}
    if dtype not in table:
        raise DistillError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return table[dtype]


def choose_layer_ids(target_config, explicit: list[int] | None) -> list[int]:
    """Explicit ids, else the reference taps for a SmolLM2-135M-shaped target, else a spread."""
    from dspark_export.models.target import TargetError, check_target_layer_ids
    from dspark_export.reference import REFERENCE_LAYER_IDS

    layers = int(target_config.num_hidden_layers)
    if explicit is not None:
        try:
            return check_target_layer_ids(list(explicit), layers)
        except TargetError as exc:
            raise DistillError(str(exc)) from exc
    shape = {k: int(getattr(target_config, k)) for k in _REFERENCE_SHAPE}
    if shape == _REFERENCE_SHAPE:
        return list(REFERENCE_LAYER_IDS)
    return default_target_layer_ids(layers)


# --------------------------------------------------------------------------------------------
# Target side
# --------------------------------------------------------------------------------------------


def load_training_target(target_dir: Path, device: torch.device, dtype: torch.dtype):
    """The target for generation and teacher forcing (SDPA attention, frozen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_export.models.target import TargetError, read_target_config

    try:
        read_target_config(target_dir)
    except TargetError as exc:
        raise DistillError(str(exc)) from exc
    model = AutoModelForCausalLM.from_pretrained(
        target_dir, dtype=dtype, attn_implementation="sdpa"
    ).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    return model, tokenizer


@torch.no_grad()
def check_feature_taps(model, layer_ids: list[int], ids: list[int], tol: float = 2e-3) -> float:
    """Compare `target_features` with the inference adapter's taps and logits (fp32, CPU).

    Returns the largest relative error; raises DistillError above `tol`, which would mean
    training and inference see different features (e.g. a transformers version change).
    """
    from dspark_export.models.target import TargetAdapter

    ref = model if next(model.parameters()).device.type == "cpu" and \
        next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float().cpu()
    ids_t = torch.tensor([ids[:64]])
    mask = torch.ones_like(ids_t)
    features, last = target_features(ref, ids_t, mask, layer_ids)
    logits = ref.get_output_embeddings()(last).float()
    adapter = TargetAdapter(ref, layer_ids)
    keys, values = adapter.empty_cache(1, 0)
    a_logits, a_features, _, _ = adapter(
        ids_t, torch.arange(ids_t.shape[1])[None], torch.tensor([0]),
        torch.tensor([ids_t.shape[1]]), keys, values,
    )

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    err = max(rel(features, a_features), rel(logits, a_logits))
    if ref is not model:
        del ref
    if err > tol:
        raise DistillError(
            f"the teacher-forced features differ from the inference adapter's by {err:.2e} "
            f"(relative); training would not match decoding"
        )
    return err


# --------------------------------------------------------------------------------------------
# Batches, anchors and the objective
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [S, L] right-padded
    attention_mask: torch.Tensor  # [S, L]
    loss_mask: torch.Tensor  # [S, L] bool: response tokens
    indices: np.ndarray  # [S] the sequences' indices in the data

    def rows(self, group: np.ndarray) -> Batch:
        """The sub-batch of rows `group`."""
        g = torch.from_numpy(group).to(self.input_ids.device)
        return Batch(self.input_ids[g], self.attention_mask[g], self.loss_mask[g],
                     self.indices[group])


def make_batch(data: DistillData, indices, pad_id: int, device: torch.device) -> Batch:
    seqs = [data.sequence(int(i)) for i in indices]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    attn = np.zeros((len(seqs), width), np.int64)
    loss = np.zeros((len(seqs), width), bool)
    for row, (i, seq) in enumerate(zip(indices, seqs)):
        ids[row, : len(seq)] = seq
        attn[row, : len(seq)] = 1
        loss[row, int(data.prompt_lengths[int(i)]): len(seq)] = True
    return Batch(torch.from_numpy(ids).to(device), torch.from_numpy(attn).to(device),
                 torch.from_numpy(loss).to(device), np.asarray(indices, dtype=np.int64))


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpec's sampler: up to `num_anchors` positions a per row, uniformly without
    replacement among those with loss_mask[a] and loss_mask[a + 1]; sorted.

    Returns (anchors [S, A] long, keep [S, A] bool); dropped slots hold 0. Runs on CPU with
    `generator` so the draw is reproducible and resumable.
    """
    mask = loss_mask.detach().cpu().bool()
    rows, length = mask.shape
    candidates = max(length - 1, 0)
    if candidates == 0:
        return (torch.zeros(rows, num_anchors, dtype=torch.long),
                torch.zeros(rows, num_anchors, dtype=torch.bool))
    valid = mask[:, :candidates] & mask[:, 1: candidates + 1]
    counts = valid.sum(1)
    keys = torch.rand(rows, candidates, generator=generator)
    keys = torch.where(valid, keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=1)
    if candidates < num_anchors:
        pad = torch.full((rows, num_anchors - candidates), length + 1, dtype=order.dtype)
        order = torch.cat([order, pad], dim=1)
    picked = order[:, :num_anchors]
    keep = torch.arange(num_anchors)[None, :] < counts.clamp(max=num_anchors)[:, None]
    picked = torch.where(keep, picked, torch.full_like(picked, length + 1))
    anchors = picked.sort(dim=1).values  # the valid anchors sort before the padding value
    anchors = torch.where(keep, anchors, torch.zeros_like(anchors))
    return anchors, keep


@dataclass
class Rows:
    """The anchor rows of a batch: which sequence, where, and the block's supervision."""

    seq: torch.Tensor  # [R] sequence index in the batch
    anchor: torch.Tensor  # [R] anchor position
    labels: torch.Tensor  # [R, G] tokens at anchor+1..anchor+G (clamped in range)
    prev: torch.Tensor  # [R, G] true previous tokens [anchor, labels[:-1]]
    eval_mask: torch.Tensor  # [R, G] bool
    pred_index: torch.Tensor  # [R, G] positions whose target logits predict the labels


def build_rows(batch: Batch, anchors: torch.Tensor, keep: torch.Tensor, block_size: int) -> Rows:
    device = batch.input_ids.device
    seq_idx, slot = keep.nonzero(as_tuple=True)
    anchor = anchors[seq_idx, slot].to(device)
    seq_idx = seq_idx.to(device)
    length = batch.input_ids.shape[1]
    offsets = torch.arange(1, block_size + 1, device=device)
    label_idx = anchor[:, None] + offsets[None, :]
    safe = label_idx.clamp(max=length - 1)
    labels = batch.input_ids[seq_idx[:, None], safe]
    in_range = label_idx < length
    valid = in_range & batch.loss_mask[seq_idx[:, None], safe]
    eval_mask = valid.to(torch.int32).cumprod(dim=-1).bool()
    anchor_ids = batch.input_ids[seq_idx, anchor]
    prev = torch.cat([anchor_ids[:, None], labels[:, :-1]], dim=1)
    return Rows(seq_idx, anchor, labels, prev, eval_mask, (safe - 1).clamp(min=0))


@dataclass
class BlockOutputs:
    """The drafter's teacher-forced outputs for every anchor row, before the vocabulary."""

    hidden: torch.Tensor  # [R, G, d] final-norm block hidden states
    w2_input: torch.Tensor | None  # [R, G, r]: Markov bias = markov_w2(w2_input)
    confidence: torch.Tensor | None  # [R, G] confidence logits


def drafter_block_outputs(
    drafter: DSparkDrafter, features: torch.Tensor, input_ids: torch.Tensor,
    anchors: torch.Tensor, keep: torch.Tensor, rows: Rows,
) -> BlockOutputs:
    """Teacher-forced block outputs for the kept anchors of a batch (`sample_anchors`).

    All blocks of a sequence run in one packed backbone pass (`packed_block_hidden`), each
    seeing the context before its anchor, as decoding does; the Markov head and the confidence
    head see the TRUE previous tokens. Rows come in `keep.nonzero()` order, as in `build_rows`.
    """
    device = input_ids.device
    anchors, keep = anchors.to(device), keep.to(device)
    anchor_ids = input_ids.gather(1, anchors)
    hidden = drafter.packed_block_hidden(features, anchors, anchor_ids)[keep]
    head, w2_input, prev_emb = drafter.markov_head, None, None
    if head is not None:
        prev_emb = head.prev_embeddings(rows.prev)
        if isinstance(head, RNNMarkovHead):  # stateful: step left to right
            state = hidden.new_zeros(hidden.shape[0], drafter.config.markov_rank)
            steps = []
            for k in range(hidden.shape[1]):
                step_input, state = head.transition_input(prev_emb[:, k], hidden[:, k], state)
                steps.append(step_input)
            w2_input = torch.stack(steps, dim=1)
        else:  # memoryless heads take the whole block at once
            w2_input, _ = head.transition_input(prev_emb, hidden, None)
    confidence = None
    if drafter.confidence_head is not None:
        confidence = drafter._confidence_logit(hidden, prev_emb)
    return BlockOutputs(hidden, w2_input, confidence)


def block_terms(drafter: DSparkDrafter, out: BlockOutputs, target_last: torch.Tensor,
                rows: Rows, head: TargetHead | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE, L1, greedy match) [R, G] against the target, computed on supervised positions only
    (zeros elsewhere) with the fused head of distill_loss.py; each target position's
    distribution is computed once for all the rows that predict it.

    With a `head` over a draft vocabulary (sorted token ids) the drafter is trained as it
    drafts, over those tokens only: L1 counts the target's mass outside them (a constant), and
    labels outside them add no CE (no logit could raise their probability above zero)."""
    if head is None:
        head = TargetHead(drafter.lm_head.weight, None, target_last.dtype)
    vocab = head.vocab
    sel = rows.eval_mask
    length, width = target_last.shape[1], target_last.shape[2]
    key = (rows.seq[:, None] * length + rows.pred_index)[sel]
    positions, index = torch.unique(key, return_inverse=True)
    markov = drafter.markov_head
    lm_weight = head.draft_lm_weight  # frozen: its draft-vocabulary rows are gathered once
    w2_weight = None if markov is None else markov.markov_w2.weight
    labels = rows.labels[sel]
    scored = torch.ones_like(labels, dtype=torch.bool)
    if vocab is not None:
        w2_weight = None if w2_weight is None else w2_weight[vocab]  # trained: per step
        labels = head.local_index[labels]
        scored = labels >= 0
        labels = labels.clamp(min=0)
    compiled = lm_weight.shape[0] >= COMPILE_MIN_VOCAB
    target = head.distributions(target_last.reshape(-1, width)[positions], compiled=compiled)
    ce, l1, match = head_terms(
        out.hidden[sel], None if out.w2_input is None else out.w2_input[sel],
        lm_weight, w2_weight, target, index, labels, compiled=compiled,
    )
    zeros = torch.zeros(sel.shape, dtype=ce.dtype, device=ce.device)
    return (zeros.masked_scatter(sel, ce * scored), zeros.masked_scatter(sel, l1),
            torch.zeros_like(sel).masked_scatter(sel, match))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(progress: float, base_lr: float, warmup_ratio: float) -> float:
    """Linear warmup over `warmup_ratio` of the run, then cosine to 0 (DeepSpec's schedule)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return base_lr * max(progress / warmup_ratio, 1e-3)
    span = max(1.0 - warmup_ratio, 1e-12)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_ratio) / span))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))


def _split_data(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed + 12345).permutation(n)
    heldout = 0 if n < 2 or fraction <= 0 else min(max(1, round(n * fraction)), 256, n - 1)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def _epoch_order(train: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    return train[np.random.default_rng([seed, epoch]).permutation(len(train))]


class _Reporter:
    """A rich progress bar on a terminal, periodic log lines otherwise."""

    def __init__(self, enabled: bool, log: Callable[[str], None]):
        self.enabled = enabled
        self.log_fn = log
        self.progress = None
        self.last = 0.0
        if enabled and sys.stdout.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )
            self.progress.start()

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            self.log_fn(message)

    def task(self, description: str, total: float | None):
        if self.progress is not None:
            return self.progress.add_task(description, total=total, info="")
        return description

    def update(self, task, completed: float, total: float | None = None, info: str = "",
               force: bool = False) -> None:
        if self.progress is not None:
            self.progress.update(task, completed=completed, total=total, info=info)
            return
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= 10.0):
            self.last = now
            total_s = f"/{int(total)}" if total else ""
            self.log_fn(f"{task}: {int(completed)}{total_s} {info}".rstrip())

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _save_checkpoint(ckpt_dir: Path, state: dict, keep: int = 2) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{state['step']:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=ckpt_dir)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_data_file(target_dir: Path, corpus_key: str, max_response_tokens: int) -> Path:
    from dspark_export.reference import cache_dir

    key = f"{target_signature(target_dir)}-{corpus_key[:12]}-r{max_response_tokens}"
    return cache_dir() / "distill-data" / f"{key}.npz"


def truncate_data(data: DistillData, tokens: int) -> DistillData:
    """The first sequences whose responses reach `tokens` response tokens."""
    response = data.lengths() - data.prompt_lengths
    cum = np.cumsum(response)
    n = int(np.searchsorted(cum, tokens) + 1) if len(cum) and cum[-1] > tokens else len(cum)
    return DistillData(
        tokens=data.tokens[: data.offsets[n]], offsets=data.offsets[: n + 1],
        prompt_lengths=data.prompt_lengths[:n], prompt_index=data.prompt_index[:n],
        prompts=data.prompts, domains=data.domains, meta=data.meta,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(draft_dir: Path) -> list[Path]:
    draft_dir = Path(draft_dir)
    single = draft_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = draft_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [draft_dir / n for n in names]
    return []


def shard_weights(draft_dir: Path | str, max_shard_bytes: int) -> list[Path]:
    """Split `model.safetensors` into shards of at most `max_shard_bytes` plus an index.

    `load_drafter` reads `model.safetensors.index.json` when there is no single file. A file
    already small enough is left alone.
    """
    from safetensors.torch import load_file, save_file

    draft_dir = Path(draft_dir)
    single = draft_dir / WEIGHTS_NAME
    if not single.is_file():
        raise DistillError(f"{single}: not found")
    if single.stat().st_size <= max_shard_bytes:
        return [single]
    tensors = load_file(single)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if nbytes + 4096 > max_shard_bytes:
            raise DistillError(f"tensor {name} ({nbytes} bytes) is larger than one shard")
        if sizes[-1] and sizes[-1] + nbytes + 4096 > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensors[name]
        sizes[-1] += nbytes
    total = len(shards)
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(draft_dir / name), metadata={"format": "pt"})
        os.chmod(draft_dir / name, 0o644)
        paths.append(draft_dir / name)
        weight_map.update({t: name for t in shard})
    index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
    (draft_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    single.unlink()
    return paths


def unshard_weights(draft_dir: Path | str) -> Path:
    """Merge `model-*-of-*.safetensors` shards (and their index) back into one file."""
    from safetensors.torch import save_file

    from dspark_export.models.draft import read_checkpoint_tensors

    draft_dir = Path(draft_dir)
    index = draft_dir / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return draft_dir / WEIGHTS_NAME
    shards = weight_files(draft_dir)
    tensors = {name: t for name, (t, _) in read_checkpoint_tensors(draft_dir).items()}
    single = draft_dir / WEIGHTS_NAME
    tmp = draft_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, single)
    index.unlink()
    for shard in shards:
        shard.unlink(missing_ok=True)
    return single


def _final_save(drafter: DSparkDrafter, out_dir: Path) -> list[Path]:
    """fp16 DeepSpec-format files moved into `out_dir` (other files there are kept)."""
    half = copy.deepcopy(drafter).to("cpu").half()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.save-", dir=out_dir.parent))
    try:
        staged = save_drafter(half, tmp / "drafter")
        for stale in [out_dir / WEIGHTS_INDEX_NAME, *out_dir.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
        moved = []
        for name in ("config.json", WEIGHTS_NAME):
            os.chmod(staged / name, 0o644)
            os.replace(staged / name, out_dir / name)
            moved.append(out_dir / name)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, after refusing to clobber what is not ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DistillError(f"{out_dir}: exists and is not a folder")
    checkpoint = latest_checkpoint(out_dir) if out_dir.is_dir() else None
    if checkpoint is not None and resume:
        return checkpoint
    if out_dir.is_dir() and any(out_dir.iterdir()):
        finished = (out_dir / TRAINING_JSON).is_file()
        ours = finished or (out_dir / CHECKPOINT_DIR).is_dir()
        if ours and not finished and not resume:
            shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
            return None
        if not overwrite:
            what = "a finished drafter" if finished else "files"
            raise DistillError(
                f"{out_dir}: already holds {what}; pass overwrite=True (--overwrite) to train "
                "a new drafter there, or choose another folder"
            )
        if not ours:
            raise DistillError(
                f"{out_dir}: is not empty and was not written by distill; refusing to replace it"
            )
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return None


def _prepare_prompts(prompts_file: Path | None, tokens: int, seed: int,
                     mix: dict[str, float] | None = None):
    if prompts_file is not None:
        prompts = load_prompts(prompts_file)
        corpus = {"source": str(prompts_file), "digest": corpus_digest(prompts),
                  "prompts": len(prompts)}
    else:
        count = int(min(60_000, max(256, tokens // 24)))
        prompts = build_corpus(count, seed, mix)
        corpus = {"source": "builtin", "seed": seed, "prompts": count,
                  "python": platform.python_version(), "digest": corpus_digest(prompts)}
        if mix is not None:
            corpus["mix"] = dict(sorted(mix.items()))
    return prompts, corpus


# Config fields that must agree for one drafter's weights to start another's training.
_ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "block_size",
                        "target_layer_ids", "markov_rank", "markov_head_type",
                        "enable_confidence_head", "confidence_head_with_markov", "vocab_size")


def init_weights_from(drafter: DSparkDrafter, init_dir: Path, target,
                      trainable: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """Copy an earlier drafter's trainable weights into `drafter` (continued training).

    The architectures must match field by field; the record returned (folder, weight digests,
    the earlier run's command and steps) goes into training.json so the lineage is stated.
    """
    from dspark_export.models.draft import load_drafter

    source = load_drafter(init_dir, target.config, target.get_input_embeddings().weight,
                          target.get_output_embeddings().weight)
    mine, theirs = drafter.config.raw, source.config.raw
    for field in _ARCHITECTURE_FIELDS:
        if mine.get(field) != theirs.get(field):
            raise DistillError(
                f"{init_dir / 'config.json'}: {field} is {theirs.get(field)!r}, but this run "
                f"trains {mine.get(field)!r}; --init needs a drafter of the same architecture")
    weights = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(weights[name].to(param.dtype))
    record: dict = {"dir": str(init_dir),
                    "files": {f.name: _sha256(f) for f in weight_files(init_dir)}}
    earlier = init_dir / TRAINING_JSON
    if earlier.is_file():
        try:
            previous = json.loads(earlier.read_text())
        except json.JSONDecodeError as exc:
            raise DistillError(f"{earlier}: not valid JSON ({exc})") from exc
        record["command"] = previous.get("command")
        record["training"] = previous.get("training")
        record["heldout_final"] = (previous.get("heldout") or {}).get("final")
        record["init_from"] = (previous.get("drafter") or {}).get("init_from")
    return record


def _run_rows(drafter, teacher: Teacher, batch: Batch, anchors, keep, settings, den, amp):
    """Forward one group of sequences; returns (loss, stats) or None without anchors."""
    rows = build_rows(batch, anchors, keep, settings.block_size)
    if rows.seq.numel() == 0:
        return None
    with amp():
        features, last = teacher.outputs(batch.input_ids, batch.attention_mask, batch.indices)
        out = drafter_block_outputs(drafter, features, batch.input_ids, anchors, keep, rows)
        ce, l1, match = block_terms(drafter, out, last, rows, teacher.head)
    return block_loss(
        ce, l1, match, rows.eval_mask, out.confidence,
        ce_weight=settings.ce_weight, tv_weight=settings.tv_weight,
        confidence_weight=settings.confidence_weight,
        loss_decay_gamma=settings.loss_decay_gamma, denominator=den,
    )


def _batch_denominator(batch: Batch, anchors, keep, settings) -> float:
    rows = build_rows(batch, anchors, keep, settings.block_size)
    w = rows.eval_mask.float() * position_weights(
        settings.block_size, settings.loss_decay_gamma, rows.eval_mask.device)[None]
    return float(w.sum()) + 1e-6


@torch.no_grad()
def evaluate(drafter, teacher: Teacher, data: DistillData, indices: np.ndarray, settings,
             pad_id: int, device: torch.device, amp, batch_size: int, anchors: int) -> dict:
    """Held-out metrics with a fixed anchor draw: mean TV, tau proxies, per-position rates."""
    was_training = drafter.training
    drafter.eval()
    weights = (settings.ce_weight, settings.tv_weight,
               settings.confidence_weight if drafter.confidence_head is not None else 0.0)
    total = LossStats()
    per_domain: dict[str, LossStats] = {}
    generator = torch.Generator().manual_seed(settings.seed + 999_983)
    domains = [data.domains[int(data.prompt_index[int(i)])] for i in indices]
    for domain in sorted(set(domains)):
        group = np.asarray([i for i, d in zip(indices, domains) if d == domain])
        stats = per_domain.setdefault(domain, LossStats())
        for start in range(0, len(group), batch_size):
            batch = make_batch(data, group[start: start + batch_size], pad_id, device)
            picked, keep = sample_anchors(batch.loss_mask, anchors, generator)
            result = _run_rows(drafter, teacher, batch, picked, keep, settings, None, amp)
            if result is not None:
                stats.add(result[1])
                total.add(result[1])
    drafter.train(was_training)
    summary = total.summary(weights)
    summary["per_domain"] = {
        d: {k: v for k, v in s.summary(weights).items()
            if k in ("tv", "tau_prob", "tau_greedy", "blocks")}
        for d, s in per_domain.items()
    }
    return summary


def _format_eval(tag: str, m: dict) -> str:
    rates = " ".join(f"{r:.2f}" for r in m["greedy_match_per_position"])
    domains = "  ".join(f"{d} {v['tau_greedy']:.2f}" for d, v in m.get("per_domain", {}).items())
    return (f"{tag}: held-out loss {m.get('loss', float('nan')):.4f}  TV {m['tv']:.4f}  "
            f"tau(prob) {m['tau_prob']:.3f}  tau(greedy) {m['tau_greedy']:.3f} [{domains}]  "
            f"greedy prefix acceptance per position {rates}  ({m['blocks']} blocks)")


def distill(
    target_dir: Path | str | None,
    out_dir: Path | str,
    *,
    block_size: int = 7,
    num_layers: int = 1,
    markov_rank: int = 64,
    markov_head_type: str = "vanilla",
    confidence_head: bool = True,
    target_layer_ids: list[int] | None = None,
    tokens: int = 200_000,
    prompts_file: Path | str | None = None,
    mix: dict[str, float] | None = None,
    data_file: Path | str | None = None,
    max_response_tokens: int = 256,
    max_prompt_tokens: int = 512,
    gen_batch_size: int | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    lr: float = LEARNING_RATE,
    warmup_ratio: float = WARMUP_RATIO,
    weight_decay: float = WEIGHT_DECAY,
    max_grad_norm: float = MAX_GRAD_NORM,
    batch_size: int | None = None,
    anchors: int | None = None,
    ce_weight: float = CE_WEIGHT,
    tv_weight: float = TV_WEIGHT,
    confidence_weight: float = CONFIDENCE_WEIGHT,
    loss_decay_gamma: float = LOSS_DECAY_GAMMA,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 200,
    heldout_fraction: float = 0.03,
    draft_vocab: int = 0,
    init_from: Path | str | None = None,
    gen_time_budget_s: float | None = None,
    train_time_budget_s: float | None = None,
    keep_checkpoints: bool = False,
    check_features: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate data with the target (or reuse it) and train a drafter into `out_dir`.

    `tokens` is the number of target response tokens to train on; `steps` (or `epochs`,
    default 3) sets the length of training and `train_time_budget_s` caps it in wall-clock
    seconds (the schedule then follows elapsed time, and training stops gracefully when the
    budget is spent). `draft_vocab` > 0 trains the drafter for the draft vocabulary of that
    many of the target's most frequent answer tokens (what `--draft-vocab` / a profile's
    `draft_vocab` of the same size deploys; block_terms). `init_from` starts from the
    weights of an earlier drafter of the same architecture (to train it further; the
    schedule restarts). `mix` weighs the built-in corpus's prompt sources
    (distill_data.SOURCE_DOMAINS, e.g. {"code_tasks": 0.5, "math": 0.5}) for new data.
    Returns `out_dir`, which holds
    `config.json`, `model.safetensors` (fp16, no embeddings/lm_head), `token_counts.json` and
    `training.json`.
    """
    wall_start = time.perf_counter()
    if steps is not None and epochs is not None:
        raise DistillError("give steps or epochs, not both")
    settings = DistillSettings(
        block_size=block_size, num_layers=num_layers, markov_rank=markov_rank,
        markov_head_type=markov_head_type, confidence_head=confidence_head,
        target_layer_ids=None if target_layer_ids is None else list(target_layer_ids),
        tokens=tokens, max_response_tokens=max_response_tokens,
        max_prompt_tokens=max_prompt_tokens, epochs=epochs, steps=steps, lr=lr,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        batch_size=batch_size, anchors=anchors, ce_weight=ce_weight, tv_weight=tv_weight,
        confidence_weight=confidence_weight if confidence_head else 0.0,
        loss_decay_gamma=loss_decay_gamma, seed=seed, heldout_fraction=heldout_fraction,
        checkpoint_every=checkpoint_every, draft_vocab=draft_vocab,
        init_from=None if init_from is None else str(Path(init_from).resolve()),
    )
    settings.validate()
    for name, budget in (("gen_time_budget_s", gen_time_budget_s),
                         ("train_time_budget_s", train_time_budget_s)):
        if budget is not None and not budget > 0:
            raise DistillError(f"{name} must be > 0 seconds, got {budget!r}")
    if gen_batch_size is not None and (not isinstance(gen_batch_size, int) or gen_batch_size < 1):
        raise DistillError(f"gen_batch_size must be a positive integer, got {gen_batch_size!r}")
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    if target_dir is None:
        from dspark_export.reference import reference_target_dir

        target_dir = reference_target_dir()
    target_dir = Path(target_dir)
    if not (target_dir / "config.json").is_file():
        raise DistillError(f"{target_dir}: no config.json; expected a Hugging Face model folder")
    out_dir = Path(out_dir)
    if settings.init_from is not None:  # fail before generation, not hours into it
        DSparkConfig.from_file(Path(settings.init_from) / CONFIG_NAME)
    if mix is not None:
        if prompts_file is not None:
            raise DistillError("a corpus mix applies to the built-in corpus, not to --prompts")
        try:
            mix = check_mix(mix)
        except DistillDataError as exc:
            raise DistillError(str(exc)) from exc
    checkpoint_path = _check_out_dir(out_dir, resume, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.batch_size is None:
        settings.batch_size = 32 if dev.type == "cuda" else 4
    if settings.anchors is None:
        settings.anchors = 64 if dev.type == "cuda" else 16
    gen_batch_size = gen_batch_size or (256 if dev.type == "cuda" else 8)
    seed_everything(seed)

    reporter = _Reporter(progress, log)
    try:
        # ---- target and data -----------------------------------------------------------
        target, tokenizer = load_training_target(target_dir, dev, compute_dtype)
        layer_ids = choose_layer_ids(target.config, settings.target_layer_ids)
        settings.target_layer_ids = layer_ids
        gen_s = 0.0
        if data_file is not None and Path(data_file).is_file() and prompts_file is None:
            try:  # reuse: its own corpus and generation settings are in its meta
                data = load_data(data_file)
            except DistillDataError as exc:
                raise DistillError(str(exc)) from exc
            if data.meta.get("target_signature") != target_signature(target_dir):
                raise DistillError(f"{data_file}: was generated with another target")
            for key in ("max_response_tokens", "max_prompt_tokens"):
                if data.meta.get(key) != getattr(settings, key):
                    reporter.log(f"data: using the data file's {key} = {data.meta.get(key)}")
                    setattr(settings, key, int(data.meta[key]))
            if data.response_tokens < settings.tokens:
                prompts = [Prompt(t, d) for t, d in zip(data.prompts, data.domains)]
                data = _generate(target, tokenizer, prompts, Path(data_file), target_dir,
                                 settings, gen_batch_size, gen_time_budget_s,
                                 data.meta["corpus"], reporter)
        else:
            prompts, corpus = _prepare_prompts(
                None if prompts_file is None else Path(prompts_file), settings.tokens, seed, mix)
            data_path = Path(data_file) if data_file is not None else default_data_file(
                target_dir, corpus["digest"], settings.max_response_tokens)
            t0 = time.perf_counter()
            data = _generate(target, tokenizer, prompts, data_path, target_dir, settings,
                             gen_batch_size, gen_time_budget_s, corpus, reporter)
            gen_s = time.perf_counter() - t0
            data_file = data_path
        data = truncate_data(data, settings.tokens)
        if check_features:
            err = check_feature_taps(target, layer_ids, data.sequence(0).tolist())
            reporter.log(f"feature taps match the inference adapter (relative error {err:.1e})")
        train_idx, heldout_idx = _split_data(data.num_sequences, settings.heldout_fraction, seed)
        if len(train_idx) == 0:
            raise DistillError("no training sequences")
        reporter.log(
            f"data: {data.num_sequences} sequences, {data.response_tokens} response tokens "
            f"({len(train_idx)} train / {len(heldout_idx)} held-out) from {data_file}"
        )
        responses = np.concatenate([data.sequence(int(i))[int(data.prompt_lengths[int(i)]):]
                                    for i in train_idx])
        vocab, vocab_record = None, None
        if settings.draft_vocab:
            counts = np.bincount(responses, minlength=int(target.config.vocab_size))
            chosen = select_draft_vocab(counts, settings.draft_vocab,
                                        data.meta.get("stop_ids") or [])
            vocab = torch.from_numpy(chosen).to(dev)
            vocab_record = {"size": len(chosen), "coverage": round(coverage(counts, chosen), 6)}
            reporter.log(f"draft vocabulary: {len(chosen)} tokens, "
                         f"{vocab_record['coverage']:.2%} of the training responses")
        teacher = Teacher(target, layer_ids, TargetHead(
            target.get_output_embeddings().weight, vocab, compute_dtype))
        cache_bytes = FeatureCache.nbytes(data, len(layer_ids) * int(target.config.hidden_size),
                                          int(target.config.hidden_size), compute_dtype)
        if cache_bytes <= FEATURE_CACHE_BYTES:
            task = reporter.task("teacher features", int(data.tokens.size))
            teacher.cache = FeatureCache.build(
                target, data, layer_ids, _autocast(dev, compute_dtype), compute_dtype,
                lambda done, total: reporter.update(task, done, total, info="tokens"))
            reporter.log(f"teacher features cached: {cache_bytes / 2**30:.2f} GiB")

        # ---- drafter and optimiser -----------------------------------------------------
        drafter = make_random_drafter(
            target.config, num_layers=settings.num_layers, block_size=settings.block_size,
            target_layer_ids=layer_ids, markov_rank=settings.markov_rank,
            markov_head_type=settings.markov_head_type, confidence=settings.confidence_head,
            seed=seed,
        )
        drafter.set_target_weights(target.get_input_embeddings(), target.get_output_embeddings())
        drafter.embed_tokens.requires_grad_(False)
        drafter.lm_head.requires_grad_(False)
        trainable = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
        init_record = None
        if settings.init_from is not None:
            init_record = init_weights_from(drafter, Path(settings.init_from), target, trainable)
            reporter.log(f"starting from the weights of {settings.init_from}")
        drafter.to(dev).train()
        optimizer = torch.optim.AdamW(
            [p for _, p in trainable], lr=settings.lr, weight_decay=settings.weight_decay,
            **({"fused": True} if dev.type == "cuda" else {}),
        )
        steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
        if settings.steps is not None:
            total_steps = settings.steps
        else:
            total_steps = max(1, math.ceil((settings.epochs or 3.0) * steps_per_epoch))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        step, train_elapsed, micro, history = 0, 0.0, 1, []
        run_key = _run_key(settings, drafter, data, total_steps)
        if checkpoint_path is not None:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
            if state.get("run_key") != run_key:
                diff = sorted(k for k in set(run_key) | set(state.get("run_key", {}))
                              if run_key.get(k) != state.get("run_key", {}).get(k))
                raise DistillError(
                    f"{checkpoint_path}: was written by a run with different settings "
                    f"({', '.join(diff)}); pass resume=False (--no-resume) to start over"
                )
            names = {n for n, _ in trainable}
            missing = names - set(state["trainable"])
            if missing:
                raise DistillError(f"{checkpoint_path}: lacks {sorted(missing)[:4]}")
            with torch.no_grad():
                for n, p in trainable:
                    p.copy_(state["trainable"][n].to(p.device, p.dtype))
            optimizer.load_state_dict(state["optimizer"])
            step, train_elapsed = int(state["step"]), float(state["elapsed"])
            micro, history = int(state.get("micro_batches", 1)), list(state.get("history", []))
            _set_rng_state(state["rng"])
            reporter.log(f"resuming from {checkpoint_path.name} at step {step}/{total_steps}")

        amp = _autocast(dev, compute_dtype)
        ckpt_dir = out_dir / CHECKPOINT_DIR
        task = reporter.task("train", total_steps)
        recent: list[dict] = []
        stopped_by = "steps"
        last_epoch_evaluated = step // steps_per_epoch
        trainable_params = [p for _, p in trainable]
        if step == 0 and len(heldout_idx):
            metrics = evaluate(drafter, teacher, data, heldout_idx, settings, pad_id,
                               dev, amp, max(1, settings.batch_size // 4), settings.anchors * 4)
            metrics.update(epoch=0, step=0)
            history.append(metrics)
            reporter.log(_format_eval("initial", metrics))
        loop_start = time.perf_counter() - train_elapsed  # the budget is training time only
        while step < total_steps:
            elapsed = time.perf_counter() - loop_start
            if train_time_budget_s is not None and elapsed >= train_time_budget_s:
                stopped_by = "time budget"
                break
            progress_frac = step / total_steps
            if train_time_budget_s is not None:
                progress_frac = max(progress_frac, elapsed / train_time_budget_s)
            lr_now = lr_at(progress_frac, settings.lr, settings.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            epoch, position = divmod(step, steps_per_epoch)
            order = _epoch_order(train_idx, seed, epoch)
            indices = order[position * settings.batch_size:(position + 1) * settings.batch_size]
            batch = make_batch(data, indices, pad_id, dev)
            picked, keep = sample_anchors(batch.loss_mask, settings.anchors,
                                          _step_generator(seed, step))
            stats, micro = _train_step(drafter, teacher, batch, picked, keep,
                                       settings, amp, optimizer, trainable_params, micro,
                                       reporter)
            step += 1
            if stats is not None:
                recent.append(stats)
                recent = recent[-20:]
            if recent:
                m = recent[-1]
                rate = step / max(time.perf_counter() - loop_start, 1e-9)
                reporter.update(task, step, total_steps, info=(
                    f"loss {m['loss']:.3f} ce {m['ce']:.3f} TV {m['tv']:.3f} "
                    f"tau~{m['tau_greedy']:.2f} lr {lr_now:.1e} {rate:.1f} steps/s"))
            if step % settings.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(ckpt_dir, _checkpoint_state(
                    trainable, optimizer, step, time.perf_counter() - loop_start, micro,
                    history, run_key))
            if (step // steps_per_epoch > last_epoch_evaluated and len(heldout_idx)
                    and step < total_steps):  # the last one is the final evaluation
                last_epoch_evaluated = step // steps_per_epoch
                eval_start = time.perf_counter()
                metrics = evaluate(drafter, teacher, data, heldout_idx, settings,
                                   pad_id, dev, amp, max(1, settings.batch_size // 4),
                                   settings.anchors * 4)
                loop_start += time.perf_counter() - eval_start  # not training time
                metrics.update(epoch=last_epoch_evaluated, step=step)
                history.append(metrics)
                reporter.log(_format_eval(f"epoch {last_epoch_evaluated}", metrics))
        train_elapsed = time.perf_counter() - loop_start
        reporter.update(task, step, total_steps, force=True,
                        info=f"done ({stopped_by}) in {train_elapsed:.0f} s")
        final_eval = None
        if len(heldout_idx):
            final_eval = evaluate(drafter, teacher, data, heldout_idx, settings,
                                  pad_id, dev, amp, max(1, settings.batch_size // 4),
                                  settings.anchors * 4)
            final_eval.update(epoch=step / steps_per_epoch, step=step)
            reporter.log(_format_eval("final", final_eval))
    finally:
        reporter.close()

    # ---- save -----------------------------------------------------------------------------
    files = _final_save(drafter, out_dir)
    files.append(write_token_counts(out_dir, responses, drafter.config.vocab_size,
                                    source="distill: the target's training responses"))
    size = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    train_tail = _mean_stats(recent)
    record = {
        "format": TRAINING_FORMAT,
        "command": command,
        "target": {"dir": str(target_dir), "signature": target_signature(target_dir),
                   "model_type": target.config.model_type,
                   "num_hidden_layers": int(target.config.num_hidden_layers)},
        "drafter": {
            "block_size": settings.block_size, "num_layers": settings.num_layers,
            "markov_rank": settings.markov_rank,
            "markov_head_type": drafter.config.markov_head_type,
            "confidence_head": settings.confidence_head, "target_layer_ids": layer_ids,
            "trainable_parameters": int(sum(p.numel() for p in trainable_params)),
            "weights_dtype": "float16", "weights_bytes": int(size),
            "files": {f.name: _sha256(f) for f in files},
            "trained_for_draft_vocab": vocab_record,
            "init_from": init_record,
        },
        "objective": {
            "ce_weight": settings.ce_weight, "tv_weight": settings.tv_weight,
            "tv_term": "DeepSpec l1 = sum_v |p_draft - p_target| = 2 TV",
            "confidence_weight": settings.confidence_weight,
            "confidence_target": "1 - TV (detached)",
            "loss_decay_gamma": settings.loss_decay_gamma,
            "position_weights": position_weights(settings.block_size,
                                                 settings.loss_decay_gamma).tolist(),
        },
        "optimizer": {"name": "AdamW", "lr": settings.lr, "weight_decay": settings.weight_decay,
                      "warmup_ratio": settings.warmup_ratio, "schedule": "linear warmup + cosine",
                      "max_grad_norm": settings.max_grad_norm},
        "data": {
            "file": str(data_file), "sequences": data.num_sequences,
            "train_sequences": int(len(train_idx)), "heldout_sequences": int(len(heldout_idx)),
            "response_tokens": data.response_tokens, "prompt_tokens": data.prompt_tokens,
            "max_response_tokens": settings.max_response_tokens,
            "corpus": data.meta.get("corpus"), "per_domain": data.summary()["sequences_per_domain"],
            "generation_s_total": data.meta.get("generation_s"),
            "generated_with": data.meta.get("generated_with"),
        },
        "training": {
            "steps": step, "planned_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "epochs": step / steps_per_epoch, "stopped_by": stopped_by,
            "batch_sequences": settings.batch_size, "anchors_per_sequence": settings.anchors,
            "micro_batches": micro, "wall_s": round(train_elapsed, 2),
            "time_budget_s": train_time_budget_s, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            platform.processor() or platform.machine(),
            "dtype": str(compute_dtype).replace("torch.", ""),
        },
        "final_train_metrics": train_tail,
        "heldout": {"per_epoch": history, "final": final_eval},
        "seed": seed,
        "wall_s": round(time.perf_counter() - wall_start, 2),
        "generation_wall_s_this_run": round(gen_s, 2),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _transformers_version()},
    }
    tmp = out_dir / f".{TRAINING_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out_dir / TRAINING_JSON)
    if not keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    log(f"saved {out_dir}: weights {size / 1e6:.2f} MB fp16 "
        f"({record['drafter']['trainable_parameters'] / 1e6:.2f} M parameters), "
        f"{step} steps in {train_elapsed:.0f} s")
    return out_dir


def _generate(target, tokenizer, prompts, data_path, target_dir, settings, gen_batch_size,
              budget, corpus, reporter) -> DistillData:
    task = reporter.task("generate", settings.tokens)

    def on_progress(done: int, total: int) -> None:
        reporter.update(task, done, total, info="response tokens")

    try:
        return generate_responses(
            target, tokenizer, prompts, data_path, target_dir=target_dir,
            tokens=settings.tokens, max_response_tokens=settings.max_response_tokens,
            max_prompt_tokens=settings.max_prompt_tokens, batch_size=gen_batch_size,
            time_budget_s=budget, corpus=corpus, on_progress=on_progress, log=reporter.log,
        )
    except DistillDataError as exc:
        raise DistillError(str(exc)) from exc


def _train_step(drafter, teacher: Teacher, batch, picked, keep, settings, amp, optimizer,
                params, micro, reporter):
    """One optimiser step, split into `micro` sequence groups; halves the groups on CUDA OOM."""
    den = _batch_denominator(batch, picked, keep, settings)
    if den <= 1e-5:
        return None, micro
    while True:
        optimizer.zero_grad(set_to_none=True)
        total = LossStats()
        try:
            groups = np.array_split(np.arange(batch.input_ids.shape[0]),
                                    min(micro, batch.input_ids.shape[0]))
            for group in groups:
                g = torch.from_numpy(group)
                result = _run_rows(drafter, teacher, batch.rows(group), picked[g], keep[g],
                                   settings, den, amp)
                if result is None:
                    continue
                loss, stats = result
                loss.backward()
                total.add(stats)
            break
        except torch.cuda.OutOfMemoryError:
            if micro >= batch.input_ids.shape[0]:
                raise
            micro *= 2
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            reporter.log(f"CUDA out of memory: splitting each step into {micro} micro-batches")
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    conf_w = settings.confidence_weight if drafter.confidence_head is not None else 0.0
    return total.summary((settings.ce_weight, settings.tv_weight, conf_w)), micro


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype != torch.float32:
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)
    import contextlib

    return contextlib.nullcontext


def _checkpoint_state(trainable, optimizer, step, elapsed, micro, history, run_key) -> dict:
    return {
        "trainable": {n: p.detach().to("cpu", copy=True) for n, p in trainable},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "micro_batches": micro,
        "history": history,
        "rng": _rng_state(),
        "run_key": run_key,
    }


def _run_key(settings: DistillSettings, drafter: DSparkDrafter, data: DistillData,
             total_steps: int) -> dict:
    key = {k: v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    key["drafter_config"] = json.dumps(drafter.config.raw, sort_keys=True)
    key["data"] = [data.num_sequences, data.response_tokens,
                   (data.meta.get("corpus") or {}).get("digest")]
    key["total_steps"] = total_steps
    return key


def _mean_stats(recent: list[dict]) -> dict | None:
    if not recent:
        return None
    keys = ("loss", "ce", "l1", "confidence_bce", "tv", "tau_prob", "tau_greedy")
    means = {k: float(np.mean([r[k] for r in recent])) for k in keys}
    return means | {"steps_averaged": len(recent)}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


__all__ = [
    "DistillError", "DistillSettings", "distill", "sample_anchors",
    "build_rows", "drafter_block_outputs", "block_terms", "target_features", "check_feature_taps",
    "shard_weights", "unshard_weights", "lr_at", "latest_checkpoint",
]
