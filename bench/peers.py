#!/usr/bin/env python
"""dspark_runtime against the peers a user would otherwise run, side by side on one machine.

DESIGN.md's bar for this 2-core CPU: our target-only path at least matches onnxruntime-genai
fp32, and the fp32 DSpark bundle (lossless) reaches 2x it. Absolute tokens/s drift between
days here, so every peer decodes every prompt in turn (alternated prompt by prompt) in one
run, and the ratios are what to quote. Peers, all greedy, fp32, batch 1, `--max-new-tokens`:

- `transformers`: eager PyTorch `generate` on the target folder;
- `genai`: onnxruntime-genai, its model built once from the same folder with its own builder
  (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`) into the dspark-export cache;
  skipped, with the reason, when `onnxruntime_genai` is not importable (it is not a dependency:
  `pip install onnxruntime-genai`);
- `target_only` and `dspark`: the bundle through `dspark_runtime` (`auto` schedule: the
  hardware-aware scheduler on the bundle's SPS table).

Every peer gets `--threads` intra-op threads (default: `os.cpu_count()`; onnxruntime-genai's own
default measured 19 instead of 35 tokens/s on 2 cores). Tokens/s is end to end per call
(prefill included, the same clock for every peer): the new tokens of all prompts over the
seconds of all calls. Prints one table, writes bench/results/peers.json. No timing asserts.

    dspark-export build && python bench/peers.py [--bundle dspark-bundle] [--per-set 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PEERS = ("transformers", "genai", "target_only", "dspark")
Generate = Callable[[list[int], int], list[int]]


def transformers_peer(target_dir: Path, stop_ids: list[int], threads: int) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    def generate(ids: list[int], max_new: int) -> list[int]:
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=max_new, eos_token_id=stop_ids,
                                 pad_token_id=stop_ids[0])
        return out[0, len(ids):].tolist()

    return generate


def genai_model_dir(target_dir: Path) -> Path:
    """onnxruntime-genai's fp32 CPU model of the target, built once (keyed by the weights)."""
    from _cache import files_digest, model_files

    from dspark_export.reference import cache_dir

    digest = files_digest(model_files(target_dir))
    out = cache_dir() / "peers" / f"genai-fp32-{target_dir.name}-{digest}"
    if (out / "genai_config.json").is_file():
        return out
    print(f"building the onnxruntime-genai model in {out} (once) ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder",
                                "-m", target_dir.name, "-i", str(target_dir),
                                "-o", str(work / "model"), "-p", "fp32", "-e", "cpu",
                                "-c", str(work / "hf-cache")], capture_output=True, text=True)
        if built.returncode:
            raise RuntimeError(f"onnxruntime-genai's builder failed on {target_dir}:\n"
                               + built.stderr[-2000:])
        os.replace(work / "model", out)
    return out


def genai_peer(target_dir: Path, threads: int) -> Generate:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(genai_model_dir(target_dir)))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def generate(ids: list[int], max_new: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    return generate


def runtime_peer(pipe, target_only: bool) -> Generate:
    def generate(ids: list[int], max_new: int) -> list[int]:
        return pipe.generate([ids], max_new_tokens=max_new,
                             target_only=target_only).requests[0].token_ids

    return generate


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarise(runs: list[dict], reference: list[dict]) -> dict:
    """Aggregate tokens/s over a peer's calls and how often it gave the reference's tokens."""
    tokens, seconds = sum(len(r["tokens"]) for r in runs), sum(r["seconds"] for r in runs)
    splits = [first_divergence(r["tokens"], ref["tokens"]) for r, ref in zip(runs, reference)]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "identical": sum(s is None for s in splits), "calls": len(runs),
            "first_divergence": [s for s in splits if s is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("dspark-bundle"),
                        help="a `dspark-export build` bundle (default: ./dspark-bundle)")
    parser.add_argument("--target", type=Path, help="HF target folder (default: reference)")
    parser.add_argument("--per-set", type=int, default=5, help="prompts per evaluation set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="intra-op threads of every peer (default: os.cpu_count())")
    args = parser.parse_args()

    from dspark_runtime.pipeline import Pipeline

    from dspark_export.profile import load_eval_prompts
    from dspark_export.reference import reference_target_dir

    chosen = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        sys.exit(f"--peers: unknown {unknown}; choose from {', '.join(PEERS)}")
    if "target_only" not in chosen:
        sys.exit("--peers must include target_only: every peer's tokens are compared with it")
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"{args.bundle}: no bundle (manifest.json missing); run `dspark-export build`")
    target_dir = args.target or reference_target_dir()
    pipe = Pipeline.from_bundle(args.bundle, backend="cpu", threads=args.threads)
    stop_ids = sorted(pipe.tokenizer.stop_ids)
    makers: dict[str, Callable[[], Generate]] = {
        "transformers": lambda: transformers_peer(target_dir, stop_ids, args.threads),
        "genai": lambda: genai_peer(target_dir, args.threads),
        "target_only": lambda: runtime_peer(pipe, True),
        "dspark": lambda: runtime_peer(pipe, False)}
    peers, skipped = {}, {}
    for name in chosen:
        try:
            peers[name] = makers[name]()
        except ImportError as err:
            skipped[name] = f"not installed ({err.name or err})"
            print(f"{name}: skipped, {skipped[name]}", flush=True)

    prompts = {domain: [pipe.encode([p])[0] for p in v["prompts"]]
               for domain, v in load_eval_prompts(args.per_set).items()}
    warm = prompts[next(iter(prompts))][0]
    for generate in peers.values():
        generate(warm, 8)  # first-call allocations and thread pools
    runs: dict[str, dict[str, list[dict]]] = {d: {p: [] for p in peers} for d in prompts}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for domain, encoded in prompts.items():
        for i, ids in enumerate(encoded):
            line = []
            for name, generate in peers.items():
                t0 = time.perf_counter()
                tokens = generate(ids, args.max_new_tokens)
                seconds = time.perf_counter() - t0
                runs[domain][name].append({"tokens": tokens, "seconds": seconds})
                line.append(f"{name} {len(tokens) / seconds:5.1f}")
            print(f"{domain:5s} {i:2d} ({len(ids):4d} prompt tokens) tok/s: " + "  ".join(line),
                  flush=True)

    table: dict[str, dict[str, dict]] = {}
    for domain in (*prompts, "all"):
        chosen_domains = list(prompts) if domain == "all" else [domain]
        table[domain] = {}
        for name in peers:
            mine = [r for d in chosen_domains for r in runs[d][name]]
            ref = [r for d in chosen_domains for r in runs[d]["target_only"]]
            table[domain][name] = summarise(mine, ref)

    domains = list(table)
    print(f"\ntokens/s end to end (greedy, fp32, batch 1, {args.max_new_tokens} new tokens, "
          f"{args.per_set} prompts a set, {args.threads} threads; dspark schedule: "
          f"{pipe.schedule})")
    print(f"{'peer':14s}" + "".join(f"{d:>8s}" for d in domains)
          + f"{'vs genai':>10s}{'vs torch':>10s}{'same tokens':>13s}")
    base = table["all"]
    for name in peers:
        row = base[name]
        ratios = [f"{row['tokens_per_s'] / base[b]['tokens_per_s']:9.2f}x" if b in base else
                  f"{'-':>10s}" for b in ("genai", "transformers")]
        print(f"{name:14s}" + "".join(f"{table[d][name]['tokens_per_s']:8.1f}" for d in domains)
              + "".join(ratios) + f"{row['identical']:>8d}/{row['calls']}")
    for name, why in skipped.items():
        print(f"{name:14s} skipped: {why}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "peers.json"
    out.write_text(json.dumps({"started": started, "bundle": str(args.bundle),
                               "target": str(target_dir), "max_new_tokens": args.max_new_tokens,
                               "per_set": args.per_set, "threads": args.threads,
                               "schedule": pipe.schedule,
                               "skipped": skipped, "results": table},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
