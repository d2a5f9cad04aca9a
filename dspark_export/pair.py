"""Loading a target/drafter pair together, with the checks that tie them to each other."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark_export.models.draft import DSparkDrafter, load_drafter
from dspark_export.models.draft_vocab import read_token_counts, select_draft_vocab
from dspark_export.models.target import TargetAdapter, load_target


@dataclass
class Pair:
    """A target with feature taps, its drafter and the tokenizer they share."""

    target: TargetAdapter
    drafter: DSparkDrafter
    tokenizer: object
    target_dir: Path
    draft_dir: Path

    def stop_ids(self) -> set[int]:
        return stop_token_ids(self.tokenizer, self.target_dir)

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, text, raw)


def resolve_dirs(target_dir: Path | None, draft_dir: Path | None) -> tuple[Path, Path]:
    """Fill in the reference pair for whichever folder was not given."""
    from dspark_export import reference

    target_dir = Path(target_dir) if target_dir else reference.reference_target_dir()
    draft_dir = Path(draft_dir) if draft_dir else reference.reference_draft_dir()
    return target_dir, draft_dir


def load_pair(target_dir: Path | None = None, draft_dir: Path | None = None,
              dtype: torch.dtype = torch.float32, draft_vocab: int = 0) -> Pair:
    """Load both models; the drafter is checked against the target and shares its embeddings.
    `draft_vocab` > 0 restricts drafting to that many of the target's most frequent tokens
    (models/draft_vocab.py; the stop tokens are always among them)."""
    target_dir, draft_dir = resolve_dirs(target_dir, draft_dir)
    model, tokenizer = load_target(target_dir, dtype=dtype)
    drafter = load_drafter(
        draft_dir,
        target_config=model.config,
        target_embeddings=model.get_input_embeddings(),
        target_lm_head=model.get_output_embeddings(),
        dtype=dtype,
    )
    adapter = TargetAdapter(model, drafter.config.target_layer_ids)
    pair = Pair(adapter, drafter, tokenizer, target_dir, draft_dir)
    if draft_vocab:
        counts = read_token_counts(draft_dir, drafter.config.vocab_size)
        drafter.restrict_vocab(select_draft_vocab(counts, draft_vocab, pair.stop_ids()))
    return pair


def encode_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """One user turn with the generation prompt (the target's chat template), or raw text."""
    if not text:
        raise ValueError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def stop_token_ids(tokenizer, target_dir: Path) -> set[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = Path(target_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids
