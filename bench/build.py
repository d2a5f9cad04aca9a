"""Build time, peak memory and bundle size for the reference pair on a profile (default `cpu`).

Runs `dspark-export build` in a fresh process; prints a table and writes
bench/results/build.json. Usage: python bench/build.py [--profile cpu]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _measure import run_measured

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        bundle = tmp / "bundle"
        wall, peak, _ = run_measured(["dspark-export", "build", "--profile", args.profile, "--out", str(bundle)])
        files = {str(p.relative_to(bundle)): p.stat().st_size for p in sorted(bundle.rglob("*")) if p.is_file()}
        sps = json.loads((bundle / "sps_table.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"profile {args.profile}: build {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB, "
          f"bundle {sum(files.values()) / 2**20:.0f} MiB")
    for name, size in files.items():
        if size > 2**20:
            print(f"  {name:<28}{size / 2**20:>8.1f} MiB")
    print("SPS(B): " + "  ".join(f"{p['tokens']}:{p['steps_per_s']:.1f}" for p in sps["points"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "build.json").write_text(json.dumps(
        {"profile": args.profile, "wall_s": wall, "peak_rss_bytes": peak, "files": files, "sps": sps}, indent=2))


if __name__ == "__main__":
    main()
