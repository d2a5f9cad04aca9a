"""Write a bundle so that a reader only ever sees a complete one, or none.

Everything is staged in a hidden sibling directory (same filesystem, so the final step is a
rename) and the manifest, with the sha256 of every other file, is written last. Any exception
inside the `with` block removes the staging directory; an existing bundle at the destination is
replaced only once the new one is complete, and a directory that is not a bundle is never
touched.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from dspark_export.build.profiles import Profile
from dspark_runtime.bundle import (FORMAT_VERSION, MANIFEST, BundleError, read_manifest,
                                   sha256_file, shapes_from_export)
from dspark_runtime.sps import write_json_atomic

_TOOLS = ("dspark-export", "onnx", "onnxruntime", "torch", "transformers", "tensorrt",
          "tensorrt-rtx-cu13-bindings", "numpy")


class BundleWriter:
    """`with BundleWriter(out) as w: ...; w.write_manifest(...)` -> `out` appears complete."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir).absolute()
        self.root: Path | None = None  # the staging directory while open
        self._manifest_written = False

    def __enter__(self) -> BundleWriter:
        _check_destination(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-",
                                          dir=self.out_dir.parent))
        os.chmod(self.root, 0o755)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        staging, self.root = self.root, None
        try:
            if exc_type is None:
                if not self._manifest_written:
                    raise BundleError(f"{self.out_dir}: write_manifest() was never called; "
                                      "no bundle written")
                _publish(staging, self.out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def path(self, rel: str) -> Path:
        """A path inside the staging directory, for steps that write their own files."""
        if self.root is None:
            raise RuntimeError("BundleWriter is not open")
        target = (self.root / rel).resolve()
        if self.root.resolve() not in target.parents:
            raise ValueError(f"{rel!r} is not a path inside the bundle")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, src: str | Path, rel: str | None = None) -> Path:
        """Copy a file (or a whole directory) into the bundle at `rel` (default: its name)."""
        src = Path(src)
        dst = self.path(rel or src.name)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
        return dst

    def write_json(self, rel: str, payload: dict[str, Any]) -> Path:
        dst = self.path(rel)
        write_json_atomic(dst, payload)
        return dst

    def write_manifest(self, *, profile: Profile, export_info: dict[str, Any],
                       graphs: dict[str, str],
                       session_options: dict[str, Any] | None = None,
                       tensorrt: dict[str, Any] | None = None,
                       notes: dict[str, str] | None = None) -> dict[str, Any]:
        """Describe the staged bundle and hash every file in it; call once, last.

        `graphs` maps graph names to files in the bundle (ONNX or engines); their inputs and
        outputs come from the export's description, `export_info` (export.json). `notes`: why
        an optional part (e.g. `sps_table`) is missing.
        """
        assert self.root is not None, "BundleWriter is not open"
        root = self.root
        for name, rel in graphs.items():
            if not (self.root / rel).is_file():
                raise BundleError(f"graph '{name}': {rel} was not written into the bundle")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "tools": tool_versions(),
            "profile_name": profile.name,
            "profile": profile.to_dict(),
            "backend": profile.backend,
            "precision": profile.precision,
            "shapes": shapes_from_export(export_info, profile.max_batch, profile.max_context),
            "models": {"target": export_info.get("target_config"),
                       "draft": export_info.get("draft_config")},
            "tokenizer": _tokenizer_info(self.root / "tokenizer", export_info),
            "graphs": {name: {"file": rel, **_io(export_info, name)}
                       for name, rel in graphs.items()},
            "session_options": session_options,
            "tensorrt": tensorrt,
            **{key: f"{key}.json" if (root / f"{key}.json").is_file() else None
               for key in ("sps_table", "calibration")},
            **({"notes": notes} if notes else {}),
        }
        manifest["files"] = hash_tree(self.root)
        write_json_atomic(self.root / MANIFEST, manifest)
        self._manifest_written = True
        return manifest


def update_bundle(bundle_dir: str | Path, files: dict[str, bytes],
                  manifest_updates: dict[str, Any]) -> dict[str, Any]:
    """Add or replace files in a finished bundle and re-record their hashes (e.g. calibration).

    Each file, then the manifest, is replaced by rename: an interruption leaves either the old
    manifest (which still matches every file it lists, except one just replaced) or the new one.
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    if manifest.get("export_folder"):
        raise BundleError(f"{root}: an export folder, not a built bundle; run dspark-export build")
    for rel, data in files.items():
        dst = root / rel
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
        manifest["files"][rel] = sha256_file(dst)
    manifest.update(manifest_updates)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the bundle (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for dist in _TOOLS:
        try:
            versions[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _io(export_info: dict[str, Any], name: str) -> dict[str, Any]:
    desc = (export_info.get("graphs") or {}).get(name) or {}
    return {"inputs": desc.get("inputs", []), "outputs": desc.get("outputs", [])}


def _tokenizer_info(tok_dir: Path, export_info: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer files, whether a chat template ships, and the ids that end generation."""
    files = sorted(p.relative_to(tok_dir).as_posix() for p in tok_dir.rglob("*") if p.is_file()) \
        if tok_dir.is_dir() else []
    config = _json_or_empty(tok_dir / "tokenizer_config.json")
    chat = bool(config.get("chat_template")) or (tok_dir / "chat_template.jinja").is_file()
    eos: list[int] = []
    for source in (export_info.get("target_config") or {},
                   _json_or_empty(tok_dir / "generation_config.json")):
        ids = source.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    return {"dir": "tokenizer", "files": files, "chat_template": chat, "eos_token_ids": eos,
            "stop_token_ids": export_info.get("stop_token_ids", eos)}


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_destination(out: Path) -> None:
    """Refuse, before any work, to replace something that is not a bundle."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BundleError(f"{out}: exists, is not empty and is not a bundle (no {MANIFEST}); "
                          "refusing to replace it")


def _publish(staging: Path, out: Path) -> None:
    """Rename the staged bundle into place, keeping the old one until the new one is there."""
    _check_destination(out)  # the destination may have changed during a long build
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "bundle")
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old / "bundle", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
