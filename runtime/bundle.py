"""Load a bundle (the output of `dspark-export build`) and refuse one this machine must not run.

A bundle is a folder with `manifest.json` (format version "1") that lists every other file with
its sha256. Loading checks those hashes, so a tampered or truncated graph is refused by name
rather than producing wrong tokens, and asks the bundle's backend (backends/ registry) whether
this machine can run it: for TensorRT, that the engines were built for this GPU's compute
capability and this TensorRT version (a foreign engine either fails to deserialize with an
opaque error or, worse, runs slowly).

A plain export folder (`export.json`, no manifest) also loads, as an ONNX Runtime fp32 bundle
without integrity checks, so `dspark-export run` works on `dspark-export export` output.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import BackendUnavailable, Platform, get_backend

FORMAT_VERSION = "1"
MANIFEST = "manifest.json"
EXPORT_INFO = "export.json"
GRAPH_NAMES = ("target", "draft", "markov", "verify")
_CHUNK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be used here; the message says why."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle; `verify=False` skips the sha256 pass (large graphs)."""
        root = Path(path)
        manifest = read_manifest(root)
        bundle = cls(root, manifest)
        if manifest.get("export_folder"):
            missing = [p for p in bundle.graphs.values() if not p.is_file()]
            if missing:
                raise BundleError(f"{root}: missing file '{missing[0].name}'")
            return bundle
        problems = check_compatibility(manifest)  # before hashing: engines can be large
        if problems:
            raise BundleError(f"{root}: cannot run here: " + "; ".join(problems))
        if verify:
            verify_files(root, manifest)
        else:
            missing = [rel for rel in manifest["files"] if not (root / rel).is_file()]
            if missing:
                raise BundleError(f"{root}: missing file '{missing[0]}'")
        return bundle

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def shapes(self) -> dict[str, Any]:
        return self.manifest.get("shapes", {})

    @property
    def graphs(self) -> dict[str, Path]:
        """Graph name -> its ONNX file or TensorRT engine."""
        return {name: self.root / g["file"] for name, g in self.manifest["graphs"].items()}

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.manifest.get("tokenizer", {}).get("dir", "tokenizer")

    @property
    def sps_table_path(self) -> Path | None:
        return self._optional("sps_table")

    @property
    def calibration_path(self) -> Path | None:
        return self._optional("calibration")

    @property
    def session_options(self) -> dict[str, Any]:
        """ONNX Runtime session settings recorded at build time (empty for TensorRT)."""
        return self.manifest.get("session_options") or {}

    def _optional(self, key: str) -> Path | None:
        rel = self.manifest.get(key)
        return self.root / rel if rel and (self.root / rel).is_file() else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest as written (no hash or platform checks): what `inspect` shows."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        if (root / EXPORT_INFO).is_file():
            return _export_folder_manifest(root)
        raise BundleError(f"{root}: missing {MANIFEST} (not a bundle, nor an export folder "
                          f"with {EXPORT_INFO})")
    manifest = _read_json(manifest_path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root}: unknown format_version {version!r} (this dspark_runtime "
                          f"reads format_version {FORMAT_VERSION!r})")
    for key, kind in (("files", dict), ("graphs", dict), ("backend", str), ("precision", str)):
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{root}: {MANIFEST} has no valid '{key}'")
    for rel in manifest["files"]:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{root}: {MANIFEST} lists a path outside the bundle: {rel!r}")
    for name, graph in manifest["graphs"].items():
        if graph.get("file") not in manifest["files"]:
            raise BundleError(f"{root}: graph '{name}' names a file the manifest does not list")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's sha256; the first missing or changed file is named."""
    for rel, expected in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{root}: missing file '{rel}'")
        if sha256_file(path) != expected:
            raise BundleError(f"{root}: sha256 mismatch for '{rel}' (the file was changed or "
                              "corrupted after the build)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_compatibility(manifest: dict[str, Any], platform: Platform | None = None) -> list[str]:
    """Reasons this machine (or `platform`) cannot run the bundle (empty when it can)."""
    try:
        backend = get_backend(manifest["backend"])
    except BackendUnavailable as exc:
        return [str(exc)]
    return backend.problems(manifest, platform or backend.probe())


def _export_folder_manifest(root: Path) -> dict[str, Any]:
    """What a manifest would say about a plain export folder (ONNX Runtime, no hashes)."""
    info = _read_json(root / EXPORT_INFO)
    graphs = {name: {"file": f"{name}.onnx"} for name in GRAPH_NAMES}
    for name, desc in (info.get("graphs") or {}).items():
        if isinstance(desc, dict):
            graphs[name] = {"file": desc.get("file", f"{name}.onnx"),
                            **{k: desc[k] for k in ("inputs", "outputs") if k in desc}}
    return {
        "format_version": FORMAT_VERSION,
        "export_folder": True,
        "backend": "onnxruntime",
        "precision": info.get("precision", "fp32"),
        "shapes": shapes_from_export(info, None, info.get("max_position_embeddings")),
        "graphs": graphs,
        "tokenizer": {"dir": "tokenizer", "stop_token_ids": info.get("stop_token_ids", [])},
        "session_options": {},
        "files": {},
        "export": info,
    }


def shapes_from_export(info: dict[str, Any], max_batch: int | None,
                       max_context: int | None) -> dict[str, Any]:
    """The manifest's `shapes`: sizes from export.json plus the profile's limits."""
    target, draft = info.get("target", {}), info.get("draft", {})
    return {"gamma": info.get("gamma"), "max_batch": max_batch, "max_context": max_context,
            "vocab_size": target.get("vocab_size"),
            "target_layer_ids": info.get("target_layer_ids"),
            "feature_size": draft.get("feature_size"),
            "mask_token_id": info.get("mask_token_id"), "target": target, "draft": draft}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data
