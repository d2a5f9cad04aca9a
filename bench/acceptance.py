"""DSpark vs the DFlash ablation: same target, same prompts, same runtime (CPU, fp32, batch 1).

Both drafters verify their whole block every step (fixed gamma, chain drafting), greedy, so tau
(tokens per step, counting the bonus token) and the conditional acceptance per draft position
measure the drafters alone. Prompts are the first turns of ../shared/eval/{gsm8k,humaneval,
mt-bench}.jsonl (math, code, chat) with the chat template; the two drafters alternate prompt
by prompt. Greedy decoding is lossless, so both must produce the same text (column `same`).

    python bench/acceptance.py [--per-domain 20] [--max-new-tokens 128] [--threads N]
                               [--dspark DIR] [--dflash DIR] [--target DIR] [--prompts FILE ...]
                               [--draft-vocab N]

Each pair is exported once into the dspark-export cache (`<cache>/bench-exports/<drafter>-<hash>`,
keyed by the drafter's and the target's files); results go to bench/results/acceptance.json.

The DFlash ablation (default `<cache>/smollm2-135m-dflash-ablation`: Markov rank 0, no
confidence head) is not shipped. It is trained like the shipped DSpark drafter (README), on the
same generations with the same objective weights, draft vocabulary and time budget:

    dspark-export distill --out DIR --data FILE --tokens 560843 --batch-size 4 --anchors 160 \
        --draft-vocab 8192 --lr 1e-3 --epochs 4 --time-budget 1800 \
        --markov-rank 0 --no-confidence-head

Each drafter drafts over the vocabulary it was trained for unless --draft-vocab says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _cache import cached_export

RESULTS = Path(__file__).parent / "results"
DFLASH_NAME = "smollm2-135m-dflash-ablation"


def _training(draft_dir: Path) -> dict | None:
    """What training.json says about the budget (None if the drafter has none)."""
    path = draft_dir / "training.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    training, data = info.get("training", {}), info.get("data", {})
    return {"command": info.get("command"), "steps": training.get("steps"),
            "train_wall_s": training.get("wall_s"), "device": training.get("device_name"),
            "response_tokens": data.get("response_tokens"),
            "markov_rank": (info.get("drafter") or {}).get("markov_rank")}


def _rates(values: list) -> str:
    return " ".join("  -  " if v is None else f"{v:.3f}" for v in values) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-domain", type=int, default=20, help="prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--target", type=Path, default=None,
                        help="target model folder (default: the reference SmolLM2-135M)")
    parser.add_argument("--dspark", type=Path, default=None,
                        help="DSpark drafter (default: the shipped reference drafter)")
    parser.add_argument("--dflash", type=Path, default=None,
                        help=f"DFlash ablation drafter (default: <cache>/{DFLASH_NAME})")
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="draft vocabulary for both drafters (default: each as trained; "
                             "0 = the full vocabulary)")
    parser.add_argument("--prompts", type=Path, action="append", default=[],
                        help="prompt file, one domain each (default: ../shared/eval)")
    parser.add_argument("--out", type=Path, default=RESULTS / "acceptance.json")
    args = parser.parse_args()

    from dspark_export.models.draft_vocab import trained_draft_vocab
    from dspark_export.profile import ModeSpec, ProfileError, load_eval_prompts, run_modes
    from dspark_export.reference import cache_dir, reference_draft_dir
    from dspark_runtime.pipeline import Pipeline
    from dspark_runtime.schedule import FixedScheduler

    dspark_dir = args.dspark or reference_draft_dir()
    dflash_dir = args.dflash or cache_dir() / DFLASH_NAME
    for label, folder in (("DSpark", dspark_dir), ("DFlash", dflash_dir)):
        if not (folder / "config.json").is_file():
            sys.exit(f"{label} drafter not found at {folder}; pass --{label.lower()} DIR "
                     "(see this script's docstring for how to reproduce the DFlash ablation)")
    try:
        prompts = load_eval_prompts(args.per_domain, args.prompts)
    except ProfileError as exc:
        sys.exit(str(exc))

    folders = {"dspark": dspark_dir, "dflash": dflash_dir}
    vocabs = {name: trained_draft_vocab(folder) if args.draft_vocab is None else args.draft_vocab
              for name, folder in folders.items()}
    pipes = {name: Pipeline.from_bundle(cached_export(args.target, folder, name, vocabs[name]),
                                        backend="cpu", threads=args.threads)
             for name, folder in folders.items()}
    if pipes["dspark"].gamma != pipes["dflash"].gamma:
        print(f"warning: block sizes differ (DSpark {pipes['dspark'].gamma}, DFlash "
              f"{pipes['dflash'].gamma}): tau is not like for like", flush=True)
    modes = [ModeSpec(name, label, pipes[name], {"schedule": FixedScheduler(pipes[name].gamma)},
                      f"{label} drafter, all {pipes[name].gamma} drafts verified every step")
             for name, label in (("dspark", "DSpark"), ("dflash", "DFlash"))]

    def show(domain: str, index: int, mode: str, result) -> None:
        print(f"{domain:6s} #{index + 1:<3d} {mode:7s} {result.new_tokens:4d} tokens "
              f"{result.tokens_per_s:6.1f} tok/s tau {result.tau:.2f}", flush=True)

    started = time.time()
    body = run_modes(modes, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                     on_result=show, compare_to="dspark")
    domains = body["domains"]
    for entry in domains.values():
        d, f = entry["modes"]["dspark"], entry["modes"]["dflash"]
        entry["tau_ratio"] = d["tau"] / f["tau"]
        entry["speedup_dspark_vs_dflash"] = d["tokens_per_s"] / f["tokens_per_s"]

    print(f"\n{'domain':8s} {'prompts':>7s} {'DSpark tau':>10s} {'DFlash tau':>10s} "
          f"{'ratio':>6s} {'DSpark tok/s':>12s} {'DFlash tok/s':>12s} {'same':>6s}")
    for domain, entry in domains.items():
        d, f = entry["modes"]["dspark"], entry["modes"]["dflash"]
        print(f"{domain:8s} {entry['prompts']:7d} {d['tau']:10.3f} {f['tau']:10.3f} "
              f"{entry['tau_ratio']:5.3f}x {d['tokens_per_s']:12.1f} {f['tokens_per_s']:12.1f} "
              f"{f['same_as_dspark']:>3d}/{entry['prompts']}")
    macro = sum(domains[d]["tau_ratio"] for d in prompts) / len(prompts)
    print(f"macro-average tau ratio DSpark/DFlash over {len(prompts)} domains: {macro:.3f}x")
    gamma = pipes["dspark"].gamma
    print(f"\nacceptance per position, P(draft k accepted | drafts < k accepted), k = 1..{gamma}")
    for domain, entry in domains.items():
        for name, label in (("dspark", "DSpark"), ("dflash", "DFlash")):
            print(f"{domain if name == 'dspark' else '':8s} {label:7s} "
                  f"{_rates(entry['modes'][name]['acceptance_per_position'])}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "settings": {"per_domain": args.per_domain, "max_new_tokens": args.max_new_tokens,
                     "temperature": 0.0, "batch": 1, "threads": args.threads, "gamma": gamma,
                     "schedule": "fixed (whole block)", "backend": "onnxruntime cpu fp32"},
        "drafters": {name: {"dir": str(folder), "draft_vocab": vocabs[name],
                            "training": _training(folder)} for name, folder in folders.items()},
        "tau_ratio_macro": macro,
        "domains": domains, "runs": body["runs"]}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
