"""Exports of a target/drafter pair cached under the dspark-export cache, keyed by their files.

Benches reuse an export across runs, and a changed drafter or target never reuses a stale one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def files_digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()[:12]


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"
                                      or p.name.endswith(".index.json")))


def cached_export(target_dir: Path | None, draft_dir: Path, label: str,
                  draft_vocab: int | None = None) -> Path:
    """The pair's export folder under the cache, created on first use; `draft_vocab` None
    drafts over the vocabulary the drafter was trained for (`distill --draft-vocab`)."""
    from dspark_export.export import export_graphs
    from dspark_export.models.draft_vocab import TOKEN_COUNTS_NAME, trained_draft_vocab
    from dspark_export.reference import cache_dir, reference_target_dir

    if draft_vocab is None:
        draft_vocab = trained_draft_vocab(draft_dir)
    target = target_dir or reference_target_dir()
    files = model_files(Path(target)) + model_files(draft_dir)
    if draft_vocab:
        files.append(draft_dir / TOKEN_COUNTS_NAME)
    name = f"{draft_dir.name}-{files_digest(files)}" + (f"-v{draft_vocab}" if draft_vocab else "")
    out = cache_dir() / "bench-exports" / name
    if not (out / "export.json").is_file():
        print(f"exporting the {label} pair to {out} (once) ...", flush=True)
        export_graphs(target_dir, draft_dir, out, draft_vocab=draft_vocab)
    return out
