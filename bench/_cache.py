"""Exports of a target/drafter pair cached under the dspark-export cache, keyed by their files.

Benches reuse an export across runs, and a changed drafter or target never reuses a stale one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def _digest(paths: list[Path]) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                sha.update(chunk)
    return sha.hexdigest()[:12]


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"
                                      or p.name.endswith(".index.json")))


def cached_export(target_dir: Path | None, draft_dir: Path, label: str) -> Path:
    """The pair's export folder under the cache, created on first use."""
    from dspark_export.export import export_graphs
    from dspark_export.reference import cache_dir, reference_target_dir

    target = target_dir or reference_target_dir()
    key = _digest(_model_files(Path(target)) + _model_files(draft_dir))
    out = cache_dir() / "bench-exports" / f"{draft_dir.name}-{key}"
    if not (out / "export.json").is_file():
        print(f"exporting the {label} pair to {out} (once) ...", flush=True)
        export_graphs(target_dir, draft_dir, out)
    return out
