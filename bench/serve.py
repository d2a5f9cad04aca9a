"""Serving under load: DSpark against the same bundle served target-only, 1/2/4/8 clients.

Starts `dspark-serve BUNDLE` twice on 127.0.0.1 (DSpark, and `--target-only`), then at each
load level runs the servers in turn with N concurrent `openai` clients, each a closed loop over
chat prompts of ../shared/eval (the same prompts in the same order for all, greedy), in
`--repeats` blocks whose server order alternates (A B, B A, ...), so the machine's drift hits
every server alike; figures pool a server's blocks, and each block's per-user median is kept to
show the spread. Prints per-user tokens/s (median over requests), aggregate tokens/s,
TTFT and latency p50/p99, tau, the mean verify length and the share of rounds that drafted
(the rest skipped drafting as not paying: runtime/draft_gate.py; all from the server's
/metrics), and whether both servers returned the same text; writes bench/results/serve.json and serve.png.

With `--llama-server BIN --gguf TARGET.gguf` llama.cpp's server runs beside them, same slots,
context, threads and prompts (its text is not compared: other kernels, other rounding).

Usage: python bench/serve.py [--bundle dspark-bundle] [--clients 1,2,4,8] [--requests 8]
                             [--repeats 2]
                             [--llama-server build/bin/llama-server --gguf target-f32.gguf]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An OpenAI-compatible server in its own process group on 127.0.0.1, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.proc = subprocess.Popen(["timeout", "7200", *cmd], start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def dspark(cls, bundle: Path, slots: int, context: int, threads: int,
               target_only: bool) -> Server:
        port = free_port()
        cmd = ["dspark-serve", str(bundle), "--port", str(port), "--model-name", MODEL,
               "--max-batch", str(slots), "--max-context", str(context), "--max-queue", "64",
               "--threads", str(threads)] + (["--target-only"] if target_only else [])
        return cls("target_only" if target_only else "dspark", cmd, port)

    @classmethod
    def llama(cls, binary: Path, gguf: Path, slots: int, context: int, threads: int) -> Server:
        """llama.cpp's llama-server: `slots` parallel sequences of `context` positions each,
        continuous batching (its default), the GGUF's chat template."""
        port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(slots * context), "-t", str(threads),
               "-tb", str(threads), "--no-webui", "--metrics"]
        return cls("llama_server", cmd, port)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        sys.exit(f"{self.name} server did not start in {timeout} s")

    def metric_sums(self) -> dict[str, float]:
        """Every dspark_* sample of /metrics by name and labels (the deltas of a load level
        give its tau, verify length and share of drafted rounds)."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        found = re.findall(r"^(dspark_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)
        return {name: float(value) for name, value in found}

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


async def one_request(client: Any, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"text": "".join(pieces), "tokens": usage.completion_tokens, "latency": end - start,
            "ttft": (first or end) - start, "tokens_per_s": usage.completion_tokens / (end - start)}


async def load_level(server: Server, prompts: list[str], clients: int, max_tokens: int
                     ) -> tuple[list[dict], float]:
    """Each client takes the next prompt when its last request ends; (requests, wall s)."""
    import openai

    # A new connection per request: reusing one that llama-server closed after a stream ends
    # fails the next request ("Server disconnected without sending a response").
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0,
                                timeout=3600, default_headers={"Connection": "close"})
    queue = list(enumerate(prompts))
    results: list[dict | None] = [None] * len(prompts)

    async def worker() -> None:
        while queue:
            i, prompt = queue.pop(0)
            results[i] = await one_request(client, [{"role": "user", "content": prompt}],
                                           max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What a load level added to each dspark_* sample of /metrics."""
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def add(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    return {name: total.get(name, 0.0) + more.get(name, 0.0) for name in {*total, *more}}


def summarise(requests: list[dict], wall: float, deltas: dict[str, float]) -> dict[str, Any]:
    rounds = deltas.get("dspark_round_tokens_count", 0.0)
    drafted = deltas.get('dspark_rounds_total{kind="drafted"}', 0.0)
    skipped = deltas.get('dspark_rounds_total{kind="target"}', 0.0)
    prompt = deltas.get("dspark_prompt_tokens_total", 0.0)
    return {
        "per_user_tokens_per_s": float(np.median([r["tokens_per_s"] for r in requests])),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in requests) / wall,
        "ttft_p50_s": float(np.percentile([r["ttft"] for r in requests], 50)),
        "ttft_p99_s": float(np.percentile([r["ttft"] for r in requests], 99)),
        "latency_p50_s": float(np.percentile([r["latency"] for r in requests], 50)),
        "latency_p99_s": float(np.percentile([r["latency"] for r in requests], 99)),
        "tau": deltas.get("dspark_round_tokens_sum", 0.0) / rounds if rounds else None,
        "mean_verify_length": deltas.get("dspark_verify_length_sum", 0.0) / rounds
        if rounds else None,
        "drafted_rounds": drafted / (drafted + skipped) if drafted + skipped else None,
        # prompt tokens copied from a slot's caches instead of prefilled (dspark servers)
        "cached_prompt_share": deltas.get("dspark_cached_prompt_tokens_total", 0.0) / prompt
        if prompt else None,
        "requests": len(requests), "wall_s": wall}


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def plot(table: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(table)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, title in (("per_user_tokens_per_s", axes[0], "per-user tokens/s"),
                           ("aggregate_tokens_per_s", axes[1], "aggregate tokens/s")):
        for mode in [m for m in ("dspark", "target_only", "llama_server") if m in table[levels[0]]]:
            ax.plot(levels, [table[c][mode][key] for c in levels], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("dspark-bundle"))
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per load level and block")
    parser.add_argument("--repeats", type=int, default=2,
                        help="blocks per server and level, the servers alternating block by "
                             "block (drift on a shared machine hits both alike)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-context", type=int, default=512,
                        help="cache positions per slot (rounds attend over all of them)")
    parser.add_argument("--llama-server", type=Path,
                        help="also serve --gguf with this llama.cpp llama-server binary, beside")
    parser.add_argument("--gguf", type=Path, help="the target as GGUF, for --llama-server")
    args = parser.parse_args()
    if (args.llama_server is None) != (args.gguf is None):
        sys.exit("--llama-server and --gguf go together")
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"{args.bundle}: no bundle (manifest.json missing); run `dspark-export build`")
    from dspark_export.profile import load_eval_prompts

    levels = [int(c) for c in args.clients.split(",")]
    per_domain = -(-args.requests // 3)
    sets = load_eval_prompts(per_domain)
    mixed = [p for group in zip(*(v["prompts"] for v in sets.values())) for p in group]
    prompts = mixed[:args.requests]
    servers = [Server.dspark(args.bundle, max(levels), args.max_context, args.threads,
                             target_only) for target_only in (False, True)]
    if args.llama_server:
        servers.append(Server.llama(args.llama_server, args.gguf, max(levels), args.max_context,
                                    args.threads))
    try:
        for server in servers:
            server.wait_ready()
        for server in servers:  # warm-up: first-call allocations and thread pools
            asyncio.run(load_level(server, prompts[:1], 1, 8))
        table: dict[int, dict[str, dict]] = {}
        texts: dict[int, dict[str, list[str]]] = {}
        for k, clients in enumerate(levels):
            runs: dict[str, list] = {server.name: [] for server in servers}
            for repeat in range(args.repeats):  # servers alternate block by block
                order = servers if (k + repeat) % 2 == 0 else servers[::-1]
                for server in order:
                    before = server.metric_sums()
                    requests, wall = asyncio.run(load_level(server, prompts, clients,
                                                            args.max_tokens))
                    runs[server.name].append(
                        (requests, wall, metric_deltas(before, server.metric_sums())))
            table[clients], texts[clients] = {}, {}
            for name, blocks in runs.items():
                deltas: dict[str, float] = {}
                for _, _, more in blocks:
                    deltas = add(deltas, more)
                table[clients][name] = summarise([r for b in blocks for r in b[0]],
                                                 sum(b[1] for b in blocks), deltas)
                # per block: how far one block's figure strays from another's
                table[clients][name]["per_user_by_block"] = [
                    round(float(np.median([r["tokens_per_s"] for r in b[0]])), 2) for b in blocks]
                texts[clients][name] = [r["text"] for b in blocks for r in b[0]]
            row = table[clients]
            same = texts[clients]["dspark"] == texts[clients]["target_only"]
            row["same_text"] = same
            # (block, prompt index, first differing character) of each text that differs
            row["differing_texts"] = [
                (k // len(prompts), k % len(prompts), _first_difference(a, b))
                for k, (a, b) in enumerate(zip(texts[clients]["dspark"],
                                               texts[clients]["target_only"])) if a != b]
            row["per_user_ratio"] = (row["dspark"]["per_user_tokens_per_s"]
                                     / row["target_only"]["per_user_tokens_per_s"])
            row["aggregate_ratio"] = (row["dspark"]["aggregate_tokens_per_s"]
                                      / row["target_only"]["aggregate_tokens_per_s"])
            if "llama_server" in row:
                row["per_user_ratio_vs_llama_server"] = (
                    row["dspark"]["per_user_tokens_per_s"]
                    / row["llama_server"]["per_user_tokens_per_s"])
            print(f"{clients} clients: per-user {row['dspark']['per_user_tokens_per_s']:.1f} vs "
                  f"{row['target_only']['per_user_tokens_per_s']:.1f} tok/s "
                  f"({row['per_user_ratio']:.2f}x), aggregate "
                  f"{row['dspark']['aggregate_tokens_per_s']:.1f} vs "
                  f"{row['target_only']['aggregate_tokens_per_s']:.1f} "
                  f"({row['aggregate_ratio']:.2f}x), same text {same}; per-user by block "
                  f"{row['dspark']['per_user_by_block']} vs "
                  f"{row['target_only']['per_user_by_block']}", flush=True)
    finally:
        for server in servers:
            server.stop()
    print("\n| clients | mode | per-user tok/s | aggregate tok/s | TTFT p50 / p99 s | "
          "latency p50 / p99 s | tau | mean verify length | drafted rounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clients, row in table.items():
        for mode in (s.name for s in servers):
            r = row[mode]
            tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
            verify = "-" if r["mean_verify_length"] is None else f"{r['mean_verify_length']:.2f}"
            drafted = "-" if r.get("drafted_rounds") is None else f"{r['drafted_rounds']:.0%}"
            print(f"| {clients} | {mode} | {r['per_user_tokens_per_s']:.1f} | "
                  f"{r['aggregate_tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / "
                  f"{r['ttft_p99_s']:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f}"
                  f" | {tau} | {verify} | {drafted} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(
        {"bundle": str(args.bundle), "max_tokens": args.max_tokens, "threads": args.threads,
         "prompts": len(prompts), "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
         "llama_server": str(args.gguf) if args.gguf else None,
         "levels": {str(c): row for c, row in table.items()}}, indent=2))
    plot(table, RESULTS / "serve.png")
    print(f"wrote {RESULTS / 'serve.json'} and serve.png")


if __name__ == "__main__":
    main()
