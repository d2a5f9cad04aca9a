"""A frequency-ranked draft vocabulary (FR-Spec; EAGLE-3's "draft vocab"): the drafter scores
only the N tokens its target emits most, so its lm_head and Markov W2 shrink from V to N rows.

On a CPU the draft stage's cost is mostly those two V-wide products (over the whole block, at
every step), not its decoder layers. Verification is unchanged and stays lossless: the draft
distribution q simply has no mass outside the draft vocabulary, and SpecVerify still sees q
over the full vocabulary. What a smaller vocabulary costs is acceptance on tokens outside it.

Counts come from the target's own answers (`distill` writes them next to the drafter as
`token_counts.json`); they are not part of DeepSpec's format, which stays as it is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

TOKEN_COUNTS_NAME = "token_counts.json"
TOKEN_COUNTS_FORMAT = "dspark-token-counts/1"


class DraftVocabError(ValueError):
    """A draft vocabulary that cannot be built (no counts, bad size)."""


def write_token_counts(out_dir: Path | str, tokens: np.ndarray, vocab_size: int,
                       source: str) -> Path:
    """Write how often each token id occurs in `tokens` (the target's responses), atomically."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    nonzero = np.flatnonzero(counts)
    record = {"format": TOKEN_COUNTS_FORMAT, "source": source, "vocab_size": int(vocab_size),
              "total": int(counts.sum()),
              "counts": {str(int(i)): int(counts[i]) for i in nonzero}}
    path = Path(out_dir) / TOKEN_COUNTS_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def read_token_counts(draft_dir: Path | str, vocab_size: int) -> np.ndarray:
    """Counts [V] from a drafter folder's token_counts.json, checked against the vocabulary."""
    path = Path(draft_dir) / TOKEN_COUNTS_NAME
    if not path.is_file():
        raise DraftVocabError(
            f"{path}: not found; a draft vocabulary needs the token counts that `dspark-export "
            "distill` writes next to the drafter (or use the full vocabulary: draft_vocab 0)")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != TOKEN_COUNTS_FORMAT:
            raise DraftVocabError(f"{path}: field 'format' is {record.get('format')!r}, "
                                  f"expected {TOKEN_COUNTS_FORMAT!r}")
        if int(record["vocab_size"]) != vocab_size:
            raise DraftVocabError(f"{path}: field 'vocab_size' is {record['vocab_size']}, but the "
                                  f"target's vocabulary has {vocab_size} tokens")
        counts = np.zeros(vocab_size, dtype=np.int64)
        for token, count in record["counts"].items():
            counts[int(token)] = int(count)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        if isinstance(exc, DraftVocabError):
            raise
        raise DraftVocabError(f"{path}: cannot read token counts: {exc}") from exc
    return counts


def select_draft_vocab(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The `size` most frequent ids (ties to the lower id), always including `always` (e.g. the
    stop tokens, so the drafter can propose the end), sorted ascending."""
    vocab_size = len(counts)
    if not 1 <= size <= vocab_size:
        raise DraftVocabError(f"draft vocabulary size {size} is not in 1..{vocab_size}")
    forced = sorted({int(t) for t in always if 0 <= int(t) < vocab_size})
    if len(forced) > size:
        raise DraftVocabError(f"draft vocabulary size {size} is smaller than the "
                              f"{len(forced)} tokens it must hold")
    order = np.lexsort((np.arange(vocab_size), -np.asarray(counts)))
    chosen = set(forced)
    for token in order:
        if len(chosen) == size:
            break
        chosen.add(int(token))
    return np.asarray(sorted(chosen), dtype=np.int64)


def coverage(counts: np.ndarray, vocab: np.ndarray) -> float:
    """Share of counted tokens that the vocabulary holds."""
    total = int(np.asarray(counts).sum())
    return float(np.asarray(counts)[vocab].sum() / total) if total else 0.0


def trained_draft_vocab(draft_dir: Path | str) -> int:
    """The draft vocabulary size the drafter was trained for (its training.json), else 0."""
    path = Path(draft_dir) / "training.json"
    if not path.is_file():
        return 0
    record = (json.loads(path.read_text()).get("drafter") or {}).get("trained_for_draft_vocab")
    return int(record["size"]) if record else 0
