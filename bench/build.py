"""Build time, peak memory and bundle size for the reference pair, per profile (default `cpu`).

Runs `dspark-export build` in a fresh process per profile; prints a table (and, for TensorRT
bundles, each engine's size, build time and layer counts from the manifest) and writes
bench/results/build.json. Usage: python bench/build.py [--profile cpu [--profile rtx4090 ...]]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _measure import run_measured

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


def measure(profile: str, scratch: Path) -> dict[str, Any]:
    """Build the reference bundle for `profile`; its figures (the bundle is deleted after)."""
    bundle = scratch / profile
    wall, peak, _ = run_measured(["dspark-export", "build", "--profile", profile,
                                  "--out", str(bundle)])
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {str(p.relative_to(bundle)): p.stat().st_size
             for p in sorted(bundle.rglob("*")) if p.is_file()}
    sps = bundle / "sps_table.json"
    tensorrt = manifest.get("tensorrt") or {}
    shutil.rmtree(bundle)
    return {"profile": profile, "backend": manifest["backend"],
            "precision": manifest["profile"]["precision"], "wall_s": round(wall, 1),
            "peak_rss_bytes": peak, "bundle_bytes": sum(files.values()), "files": files,
            "targets": tensorrt.get("compute_capabilities"),
            "builder": tensorrt and f"{tensorrt['builder']} {tensorrt['version']}",
            "engines": {name: {k: e.get(k) for k in ("bytes", "build_seconds",
                                                     "network_layers", "engine_layers")}
                        for name, e in (tensorrt.get("engines") or {}).items()},
            "sps": json.loads(sps.read_text()) if sps.is_file() else None,
            "notes": manifest.get("notes")}


def report(row: dict[str, Any]) -> None:
    targets = f"  targets {','.join(row['targets'])}" if row["targets"] else ""
    print(f"{row['profile']:<10} {row['backend']:<12} {row['precision']:<5} build "
          f"{row['wall_s']:>6.1f} s  peak RSS {row['peak_rss_bytes'] / MIB:>6.0f} MiB  bundle "
          f"{row['bundle_bytes'] / MIB:>6.0f} MiB{targets}")
    for name, e in row["engines"].items():
        print(f"    {name:<7} {e['bytes'] / MIB:>7.1f} MiB  {e['build_seconds']:>6.1f} s  "
              f"layers {e['network_layers']} network / {e['engine_layers']} engine")
    if row["sps"]:
        print("    SPS(B): " + "  ".join(f"{p['tokens']}:{p['steps_per_s']:.1f}"
                                         for p in row["sps"]["points"]))
    for key, why in (row["notes"] or {}).items():
        print(f"    no {key}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", action="append", help="a profile name (repeatable)")
    profiles = parser.parse_args().profile or ["cpu"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile in profiles:
            try:
                rows.append(measure(profile, Path(tmp)))
            except subprocess.CalledProcessError as exc:  # report it, go on with the others
                lines = [line for line in (exc.stderr or "").splitlines() if line.strip()]
                rows.append({"profile": profile, "error": lines[-1] if lines else str(exc)})
                print(f"{profile:<10} FAILED: {rows[-1]['error']}")
                continue
            report(rows[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "build.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
