"""Export time and peak memory for a target/drafter pair (default: the reference pair).

Each precision is exported in a fresh subprocess so its peak RSS is its own. Prints a table and
writes JSON to bench/results/export.json. Usage: python bench/export.py [--precision fp32 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _measure import run_measured

RESULTS = Path(__file__).parent / "results"

CHILD = """
import sys, time
from pathlib import Path
from dspark_export.export import export_graphs
steps = {}
last = [time.perf_counter(), None]
def on_step(name):
    now = time.perf_counter()
    if last[1]:
        steps[last[1]] = now - last[0]
    last[:] = [now, name]
export_graphs(None, None, Path(sys.argv[1]), precision=sys.argv[2], on_step=on_step)
steps[last[1]] = time.perf_counter() - last[0]
import json; print(json.dumps(steps))
"""


def fp32_weight_bytes() -> int:
    from safetensors import safe_open

    from dspark_export.pair import resolve_dirs

    total = 0
    for folder in resolve_dirs(None, None):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                count = 1
                for d in sl.get_shape():
                    count *= d
                total += 4 * count
    return total


def run(precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall, peak, stdout = run_measured([sys.executable, "-c", CHILD, str(Path(tmp) / "export"), precision])
        sizes = {p.name: p.stat().st_size for p in (Path(tmp) / "export").glob("*.onnx*")}
    steps = json.loads(stdout.strip().splitlines()[-1])
    return {"precision": precision, "wall_s": wall, "peak_rss_bytes": peak,
            "steps_s": steps, "graph_bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    weights = fp32_weight_bytes()
    rows = [run(p) for p in args.precision]
    print(f"fp32 weights of the pair: {weights / 2**20:.0f} MiB")
    print(f"{'precision':<10}{'wall s':>8}{'peak RSS MiB':>14}{'x weights':>11}  steps (s)")
    for r in rows:
        steps = " ".join(f"{k}={v:.1f}" for k, v in r["steps_s"].items())
        print(f"{r['precision']:<10}{r['wall_s']:>8.1f}{r['peak_rss_bytes'] / 2**20:>14.0f}"
              f"{r['peak_rss_bytes'] / weights:>11.2f}  {steps}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps({"fp32_weight_bytes": weights, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
