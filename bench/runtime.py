"""DSpark vs target-only through the same dspark_runtime loop (CPU, fp32, batch 1, greedy).

Prompts are the first turns of ../shared/eval/{gsm8k,humaneval,mt-bench}.jsonl with the chat
template. The two modes alternate prompt by prompt, so machine load drifts hit both alike.
Reports tokens/s, tau, time per stage per step, and the host overhead (decode time spent
outside graph runs). No timing asserts: figures drift ~15 % between runs on a shared machine.

    python bench/runtime.py [--bundle DIR] [--per-set 2] [--max-new-tokens 128] [--threads N]

Without --bundle the reference pair is exported once into the dspark-export cache. DSpark
runs the bundle's `auto` schedule (hardware-aware with an SPS table, which a cached export
lacks: then the confidence threshold).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _cache import cached_export

from dspark_export.profile import DECODE_STAGES as STAGES
from dspark_export.profile import load_eval_prompts, summarise

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle or export folder (default: reference)")
    parser.add_argument("--per-set", type=int, default=2, help="prompts per eval set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    from dspark_runtime.pipeline import Pipeline

    from dspark_export.reference import reference_draft_dir

    bundle = args.bundle or cached_export(None, reference_draft_dir(), "reference")
    pipe = Pipeline.from_bundle(bundle, backend="cpu", threads=args.threads)
    prompts = {domain: v["prompts"] for domain, v in load_eval_prompts(args.per_set).items()}
    sets = tuple(prompts)
    pipe.generate([prompts[sets[0]][0]], max_new_tokens=8)  # warm-up: first-run allocations
    pipe.generate([prompts[sets[0]][0]], max_new_tokens=8, target_only=True)
    runs: dict[str, dict[str, list]] = {s: {"target_only": [], "dspark": []} for s in sets}
    started = time.time()
    for name in sets:
        for prompt in prompts[name]:
            for mode in ("target_only", "dspark"):
                result = pipe.generate([prompt], max_new_tokens=args.max_new_tokens,
                                       target_only=mode == "target_only")
                runs[name][mode].append(result)
                print(f"{name:9s} {mode:11s} {result.new_tokens:4d} tokens "
                      f"{result.tokens_per_s:6.1f} tok/s tau {result.tau:.2f}", flush=True)

    table = {}
    for name in (*sets, "all"):
        chosen = sets if name == "all" else (name,)
        table[name] = {mode: summarise([r for s in chosen for r in runs[s][mode]])
                       for mode in ("target_only", "dspark")}
        table[name]["speedup"] = (table[name]["dspark"]["tokens_per_s"]
                                  / table[name]["target_only"]["tokens_per_s"])

    print(f"\n{'set':10s} {'target tok/s':>12s} {'dspark tok/s':>12s} {'speedup':>8s} "
          f"{'tau':>5s} {'host% (t/d)':>12s}")
    for name, row in table.items():
        t, d = row["target_only"], row["dspark"]
        print(f"{name:10s} {t['tokens_per_s']:12.1f} {d['tokens_per_s']:12.1f} "
              f"{row['speedup']:7.2f}x {d['tau']:5.2f} "
              f"{100 * t['host_overhead']:5.1f}/{100 * d['host_overhead']:4.1f}")
    print(f"\nms per step (all sets){'':2s}" + " ".join(f"{s:>13s}" for s in (*STAGES, "total")))
    for mode in ("target_only", "dspark"):
        row = table["all"][mode]
        print(f"{mode:24s}" + " ".join(f"{row['stage_ms_per_step'][s]:13.2f}" for s in STAGES)
              + f"{row['step_ms']:14.2f}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "runtime.json"
    out.write_text(json.dumps({
        "bundle": str(bundle),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "max_new_tokens": args.max_new_tokens, "per_set": args.per_set, "threads": args.threads,
        "gamma": pipe.gamma, "results": table}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
