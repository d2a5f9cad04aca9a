"""Export a target/drafter pair into the four graphs plus `export.json`, atomically."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from dspark_export import __version__
from dspark_export.export.torch_onnx import IR_VERSION, describe_io, export_graph
from dspark_export.export.wrappers import draft_spec, markov_spec, target_spec
from dspark_export.models.draft_vocab import TOKEN_COUNTS_NAME, coverage, read_token_counts
from dspark_export.pair import Pair, load_pair

EXPORT_FORMAT_VERSION = 1
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPHS = ("target", "draft", "markov", "verify")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


class ExportError(ValueError):
    """An export request that cannot be carried out (bad option, existing folder, ...)."""


def _verify_model(opset: int) -> onnx.ModelProto:
    from dspark_plugins.spec_verify.onnx_function import make_verify_model

    return make_verify_model(opset=opset, ir_version=IR_VERSION)


def _copy_tokenizer(target_dir: Path, out: Path) -> list[str]:
    out.mkdir()
    copied = []
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copy2(target_dir / name, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise ExportError(f"{target_dir}: no tokenizer.json (a fast tokenizer is required)")
    return copied


def describe_pair(pair: Pair, precision: str, opset: int) -> dict:
    """The model-level half of `export.json`: what the runtime needs to size caches and loop."""
    s, c = pair.target.shapes, pair.drafter.config
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "dspark_export_version": __version__,
        "precision": precision,
        "opset": opset,
        "ir_version": IR_VERSION,
        "gamma": c.block_size,
        "mask_token_id": c.mask_token_id,
        "target_layer_ids": list(c.target_layer_ids),
        "markov_rank": c.markov_rank,
        "markov_head_type": c.markov_head_type,
        "confidence_head": c.enable_confidence_head,
        "stop_token_ids": sorted(pair.stop_ids()),
        "max_position_embeddings": int(pair.target.model.config.max_position_embeddings),
        "target": {"num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
                   "hidden_size": s.hidden_size, "vocab_size": s.vocab_size},
        "draft": {"num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                  "hidden_size": c.hidden_size, "feature_size": c.feature_size},
        "target_config": pair.target.model.config.to_dict(),
        "draft_config": c.raw,
        "draft_vocab": _draft_vocab_record(pair),
    }


def _draft_vocab_record(pair: Pair) -> dict | None:
    """Size and coverage of the drafter's vocabulary when it is restricted, else None."""
    vocab = pair.drafter.draft_vocab
    if vocab is None:
        return None
    counts = read_token_counts(pair.draft_dir, pair.drafter.config.vocab_size)
    return {"size": int(vocab.numel()), "coverage": round(coverage(counts, vocab.numpy()), 6),
            "source": TOKEN_COUNTS_NAME}


def export_graphs(
    target_dir: Path | None,
    draft_dir: Path | None,
    out_dir: Path,
    *,
    precision: str = "fp32",
    opset: int = 18,
    draft_vocab: int = 0,
    on_step: Callable[[str], None] = lambda name: None,
) -> Path:
    """Write target/draft/markov/verify ONNX graphs, `export.json` and `tokenizer/` to `out_dir`.

    `draft_vocab` > 0 exports a drafter that scores only that many tokens (load_pair).
    Everything is written into a temporary sibling folder that is renamed at the end, so an
    interrupted export leaves nothing behind. An existing export folder is replaced; any
    other existing, non-empty folder is refused.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if opset < 18:
        raise ExportError(f"opset {opset} is too old; 18 or newer is required")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "export.json").is_file():
        raise ExportError(f"{out_dir}: exists and is not an export folder; choose another --out")
    on_step("load")
    dtype = PRECISIONS[precision]
    pair = load_pair(target_dir, draft_dir, dtype=dtype, draft_vocab=draft_vocab)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        graphs = {}
        specs = {"target": lambda: target_spec(pair.target, dtype),
                 "draft": lambda: draft_spec(pair.drafter, dtype),
                 "markov": lambda: markov_spec(pair.drafter, dtype)}
        for name in GRAPHS:
            on_step(name)
            path = tmp / f"{name}.onnx"
            if name == "verify":
                onnx.save_model(_verify_model(opset), str(path))
            else:
                export_graph(specs[name](), path, opset)
            graphs[name] = {"file": path.name, **describe_io(path)}
        on_step("tokenizer")
        tokenizer_files = _copy_tokenizer(pair.target_dir, tmp / "tokenizer")
        description = describe_pair(pair, precision, opset)
        description.update(graphs=graphs, tokenizer={"dir": "tokenizer", "files": tokenizer_files})
        (tmp / "export.json").write_text(json.dumps(description, indent=2, sort_keys=True, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
