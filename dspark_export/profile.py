"""`dspark-export profile`: what a bundle gives users, per domain, through the same runtime loop.

Four modes run on one loaded bundle (dspark_runtime, batch 1):

- `target_only`: the target alone (the loop with gamma 0);
- `dspark_fixed`: DSpark verifying the whole draft block (gamma drafts per step);
- `dspark_scheduled`: DSpark with confidence-scheduled verify lengths (the hardware-aware
  scheduler when the bundle carries an SPS(B) table, else the static confidence threshold);
- `mtp1`: an MTP-1-style budget, one draft token verified per step (two verify positions).
  It still runs the bundle's drafter, so its draft cost is that of a full block; a dedicated
  MTP head would be cheaper to run, never more accurate at position 1.

Modes are interleaved prompt by prompt (their order rotates from prompt to prompt), so machine
load drift and cache warmth hit all of them alike. Per domain and mode the report gives tau
(tokens per step, counting the bonus token), the conditional acceptance per draft position
pooled over all steps, tokens/s (new tokens over summed decode time), time per stage, the host
overhead, speed-ups vs target-only and vs MTP-1, and (greedy only) how many outputs equal the
target-only output token for token.

The helpers `load_eval_prompts`, `summarise` and `pooled_acceptance` are shared with the
scripts in bench/.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE_FORMAT = "dspark-profile/1"
# ../shared/eval next to the checkout; DSPARK_EVAL_DIR overrides it.
EVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "eval"
EVAL_SETS = {"math": "gsm8k", "code": "humaneval", "chat": "mt-bench"}
DECODE_STAGES = ("draft", "markov", "schedule", "target_verify", "spec_verify", "host")
MODES = ("target_only", "dspark_fixed", "dspark_scheduled", "mtp1")
ALL = "all"


class ProfileError(ValueError):
    """Bad profile input (prompt files, settings); the message says what to fix."""


# ---------------------------------------------------------------------------------- prompts

def eval_dir() -> Path:
    return Path(os.environ.get("DSPARK_EVAL_DIR") or EVAL_DIR)


def read_prompt_file(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Prompts from a file: JSON lines with `turns` (first turn), `prompt` or `text`, or plain
    text with one prompt a line. Blank lines are skipped; at most `limit` prompts."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read prompts ({exc})") from exc
    prompts: list[str] = []
    jsonl = path.suffix in (".jsonl", ".json")
    for number, line in enumerate(lines, 1):
        if limit is not None and len(prompts) >= limit:
            break
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
        text = None
        if isinstance(row, dict):
            turns = row.get("turns")
            text = turns[0] if isinstance(turns, list) and turns else row.get("prompt",
                                                                               row.get("text"))
        elif isinstance(row, str):
            text = row
        if not isinstance(text, str) or not text.strip():
            raise ProfileError(f"{path}:{number}: expected a non-empty 'turns' list, 'prompt' or "
                               "'text' field")
        prompts.append(text)
    if not prompts:
        raise ProfileError(f"{path}: no prompts in the file")
    return prompts


def load_eval_prompts(per_domain: int, files: Sequence[str | os.PathLike] = ()
                      ) -> dict[str, dict[str, Any]]:
    """{domain: {"source": file, "prompts": [...]}}: the first `per_domain` prompts of each file,
    or of ../shared/eval's gsm8k (math), humaneval (code) and mt-bench (chat) without files.
    A given file's domain is its name without the extension."""
    if per_domain < 1:
        raise ProfileError(f"prompts per domain must be >= 1, got {per_domain}")
    if files:
        sources = {}
        for file in files:
            name = Path(file).stem
            if name in sources or name == ALL:
                raise ProfileError(f"two prompt files give the domain name {name!r} "
                                   f"({sources.get(name, name)} and {file}); rename one")
            sources[name] = Path(file)
    else:
        root = eval_dir()
        sources = {domain: root / f"{stem}.jsonl" for domain, stem in EVAL_SETS.items()}
        missing = [str(p) for p in sources.values() if not p.is_file()]
        if missing:
            raise ProfileError(f"evaluation prompts not found ({', '.join(missing)}); pass "
                               "--prompts FILE (or set DSPARK_EVAL_DIR)")
    return {domain: {"source": str(path), "prompts": read_prompt_file(path, per_domain)}
            for domain, path in sources.items()}


# ---------------------------------------------------------------------------------- modes

@dataclass
class ModeSpec:
    """One way of decoding: what pipeline to use and what to pass to `generate`."""

    name: str
    label: str
    pipe: Any
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def profile_modes(pipe: Any) -> list[ModeSpec]:
    """The four modes of `dspark-export profile` on one pipeline."""
    from dspark_runtime.schedule import FixedScheduler, auto_schedule

    gamma = pipe.gamma
    scheduled = auto_schedule(pipe.sps)
    scheduler = pipe.make_scheduler(scheduled)
    why = ("hardware-aware (paper Algorithm 1, the bundle's SPS(B) table)" if pipe.sps is not None
           else f"confidence threshold {pipe.threshold:g} (the bundle has no SPS(B) table)")
    return [
        ModeSpec("target_only", "target only", pipe, {"target_only": True},
                 "the target alone, one token per step"),
        ModeSpec("dspark_fixed", f"DSpark fixed {gamma}", pipe,
                 {"schedule": FixedScheduler(gamma)}, f"verify all {gamma} drafts every step"),
        ModeSpec("dspark_scheduled", f"DSpark {scheduled}", pipe, {"schedule": scheduler},
                 f"verify lengths from calibrated confidences: {why}"),
        ModeSpec("mtp1", "MTP-1 budget", pipe, {"schedule": FixedScheduler(1)},
                 "one draft token per step (the drafter's first; draft cost of a full block)"),
    ]


# ---------------------------------------------------------------------------------- summaries

def pooled_acceptance(results: Sequence[Any]) -> list[float | None]:
    """P(draft k accepted | drafts < k accepted and k verified), pooled over every step of
    every request; None where no step verified position k."""
    rounds = [(a, v) for r in results for req in r.requests for a, v in zip(req.accepted,
                                                                              req.verified)]
    depth = max((v for _, v in rounds), default=0)
    rates: list[float | None] = []
    for k in range(1, depth + 1):
        reached = sum(1 for a, v in rounds if v >= k and a >= k - 1)
        passed = sum(1 for a, _ in rounds if a >= k)
        rates.append(passed / reached if reached else None)
    return rates


def summarise(results: Sequence[Any]) -> dict[str, Any]:
    """Aggregate `GenerateResult`s: tokens/s over summed decode time, tau over all steps,
    stage times per step and per token, prefill, host overhead, acceptance per position."""
    if not results:
        raise ValueError("nothing to summarise")
    steps = sum(r.steps for r in results)
    tokens = sum(r.new_tokens for r in results)
    decode = sum(r.decode_s for r in results)
    graph = sum(r.graph_seconds for r in results)
    rounds = sum(len(req.accepted) for r in results for req in r.requests)
    accepted = sum(sum(req.accepted) for r in results for req in r.requests)
    verified = sum(sum(req.verified) for r in results for req in r.requests)
    stage_s = {s: sum(r.seconds.get(s, 0.0) for r in results) for s in DECODE_STAGES}
    return {
        "requests": sum(len(r.requests) for r in results),
        "new_tokens": tokens,
        "steps": steps,
        "decode_s": decode,
        "tokens_per_s": tokens / decode if decode > 0 else 0.0,
        "tau": accepted / rounds + 1.0 if rounds else 1.0,
        "mean_verify_length": verified / rounds if rounds else 0.0,
        "acceptance_per_position": pooled_acceptance(results),
        "step_ms": 1e3 * decode / steps if steps else 0.0,
        "stage_ms_per_step": {s: 1e3 * v / steps if steps else 0.0 for s, v in stage_s.items()},
        "stage_ms_per_token": {s: 1e3 * v / tokens if tokens else 0.0 for s, v in stage_s.items()},
        "prefill_ms": 1e3 * sum(r.seconds.get("prefill", 0.0) for r in results) / len(results),
        "host_overhead": 1.0 - graph / decode if decode > 0 else 0.0,
    }


# ---------------------------------------------------------------------------------- the run

ResultCallback = Callable[[str, int, str, Any], None]  # (domain, prompt index, mode, result)


def run_modes(modes: Sequence[ModeSpec], prompts: Mapping[str, Mapping[str, Any]], *,
              max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
              on_result: ResultCallback | None = None, warmup: bool = True,
              compare_to: str = "target_only") -> dict[str, Any]:
    """Run every mode on every prompt, interleaved prompt by prompt, and summarise.

    Every prompt is encoded by every mode's pipeline before anything runs, so a prompt that is
    too long fails at once. Returns {"domains": {domain | "all": {"source", "prompts",
    "modes": {mode: summary}}}, "runs": [per-prompt records]}. With greedy decoding, each
    summary and run also says whether the output equals mode `compare_to`'s token for token
    (`same_as_target` for target-only, else `same_as_<mode>`): lossless modes must agree.
    """
    same = "same_as_target" if compare_to == "target_only" else f"same_as_{compare_to}"
    compare = temperature == 0 and any(m.name == compare_to for m in modes)
    from dspark_runtime.pipeline import PromptError

    if not modes:
        raise ProfileError("no modes to run")
    for domain, entry in prompts.items():
        for spec in modes:
            try:
                spec.pipe.encode(entry["prompts"])
            except PromptError as exc:
                raise ProfileError(f"{domain} ({entry.get('source')}): {exc}") from exc
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if warmup:  # first-run allocations of every graph at the shapes this run uses
        first = next(iter(prompts.values()))["prompts"][0]
        for spec in modes:
            spec.pipe.generate([first], **dict(options, max_new_tokens=min(8, max_new_tokens)),
                               **spec.options)
    results: dict[str, dict[str, list]] = {d: {m.name: [] for m in modes} for d in prompts}
    runs = []
    turn = 0
    for domain, entry in prompts.items():
        for index, prompt in enumerate(entry["prompts"]):
            order = [modes[(turn + i) % len(modes)] for i in range(len(modes))]
            turn += 1
            outputs = {}
            for spec in order:
                result = spec.pipe.generate([prompt], **options, **spec.options)
                results[domain][spec.name].append(result)
                outputs[spec.name] = result.requests[0].token_ids
                runs.append({"domain": domain, "prompt": index, "mode": spec.name,
                             "new_tokens": result.new_tokens, "steps": result.steps,
                             "tau": result.tau, "tokens_per_s": result.tokens_per_s,
                             "finish_reason": result.requests[0].finish_reason})
                if on_result is not None:
                    on_result(domain, index, spec.name, result)
            if compare:
                for run in runs[-len(modes):]:
                    run[same] = outputs[run["mode"]] == outputs[compare_to]
    domains: dict[str, Any] = {}
    for domain in (*prompts, ALL):
        chosen = list(prompts) if domain == ALL else [domain]
        summaries = {}
        for spec in modes:
            summary = summarise([r for d in chosen for r in results[d][spec.name]])
            if compare:
                summary[same] = sum(1 for run in runs if run["domain"] in chosen
                                    and run["mode"] == spec.name and run[same])
            summaries[spec.name] = summary
        domains[domain] = {
            "source": None if domain == ALL else prompts[domain].get("source"),
            "prompts": sum(len(prompts[d]["prompts"]) for d in chosen),
            "modes": summaries,
        }
        add_speedups(summaries)
    return {"domains": domains, "runs": runs}


def add_speedups(summaries: dict[str, dict[str, Any]]) -> None:
    """Each mode's tokens/s over target-only's and over MTP-1's (None where either is absent)."""
    for base, key in (("target_only", "speedup_vs_target_only"), ("mtp1", "speedup_vs_mtp1")):
        ref = summaries.get(base, {}).get("tokens_per_s")
        for summary in summaries.values():
            summary[key] = summary["tokens_per_s"] / ref if ref else None


def profile_bundle(pipe: Any, prompts: Mapping[str, Mapping[str, Any]], *, bundle: str,
                   max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                   threads: int | None = None,
                   on_result: ResultCallback | None = None) -> dict[str, Any]:
    """The whole `profile` report (what profile.json holds) for a loaded pipeline."""
    from dspark_runtime.schedule import auto_schedule

    modes = profile_modes(pipe)
    started = time.time()
    body = run_modes(modes, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, on_result=on_result)
    return {
        "format": PROFILE_FORMAT,
        "bundle": str(bundle),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": threads},
        "settings": {"per_domain": max(len(p["prompts"]) for p in prompts.values()),
                     "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                     "batch": 1, "gamma": pipe.gamma,
                     "scheduler": auto_schedule(pipe.sps),
                     "threshold": pipe.threshold,
                     "calibrated": pipe.calibration is not None},
        "modes": {m.name: {"label": m.label, "description": m.description} for m in modes},
        **body,
    }


# ---------------------------------------------------------------------------------- output

def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:{spec}}{suffix}"


def format_tables(report: Mapping[str, Any]) -> str:
    """The printed tables: per domain and mode, then time per stage over all domains."""
    labels = {name: m["label"] for name, m in report["modes"].items()}
    width = max(len(v) for v in labels.values())
    greedy = report["settings"]["temperature"] == 0
    head = (f"{'domain':8s} {'mode':{width}s} {'tok/s':>7s} {'tau':>5s} {'verify':>6s} "
            f"{'vs target':>9s} {'vs MTP-1':>8s} {'same':>7s}  acceptance per position")
    lines = [head, "-" * len(head)]
    for domain, entry in report["domains"].items():
        for name, s in entry["modes"].items():
            rates = " ".join(_fmt(r) for r in s["acceptance_per_position"]) or "-"
            same = f"{s['same_as_target']}/{s['requests']}" if greedy and "same_as_target" in s \
                else "-"
            lines.append(f"{domain:8s} {labels[name]:{width}s} {s['tokens_per_s']:7.1f} "
                         f"{s['tau']:5.2f} {s['mean_verify_length']:6.2f} "
                         f"{_fmt(s['speedup_vs_target_only'], '.2f', 'x'):>9s} "
                         f"{_fmt(s['speedup_vs_mtp1'], '.2f', 'x'):>8s} {same:>7s}  {rates}")
        lines.append("")
    stages = (*DECODE_STAGES, "total")
    lines.append("ms per generated token, all domains  (prefill: ms per prompt)")
    lines.append(f"{'mode':{width}s} " + " ".join(f"{s:>13s}" for s in stages)
                 + f" {'prefill':>9s} {'host%':>6s}")
    for name, s in report["domains"][ALL]["modes"].items():
        per = s["stage_ms_per_token"]
        lines.append(f"{labels[name]:{width}s} "
                     + " ".join(f"{per[k]:13.2f}" for k in DECODE_STAGES)
                     + f" {sum(per.values()):13.2f} {s['prefill_ms']:9.1f} "
                     f"{100 * s['host_overhead']:6.1f}")
    return "\n".join(lines)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: p.write_text(json.dumps(report, indent=2) + "\n",
                                               encoding="utf-8"))
    return path


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """tokens_per_s.png (grouped bars: mode per domain), acceptance.png (conditional acceptance
    per draft position, one panel per domain, one line per drafting mode) and stages.png
    (stacked ms per generated token, all domains)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {name: m["label"] for name, m in report["modes"].items()}
    modes = list(labels)
    domains = list(report["domains"])
    written = []

    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(domains), 4.2))
    bar = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [report["domains"][d]["modes"][mode]["tokens_per_s"] for d in domains]
        bars = ax.bar([x + (i - (len(modes) - 1) / 2) * bar for x in range(len(domains))],
                      values, bar, label=labels[mode])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("tokens/s (decode)")
    ax.set_title(f"tokens/s per mode  (batch 1, {report['settings']['max_new_tokens']} new "
                 f"tokens, T={report['settings']['temperature']:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "tokens_per_s.png")
    _atomic_write(written[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)

    drafting = [m for m in modes if m != "target_only"]
    gamma = max([report["settings"].get("gamma") or 1]
                + [len(e["modes"][m]["acceptance_per_position"])
                   for e in report["domains"].values() for m in drafting])
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.4), sharey=True,
                             squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for mode in drafting:
            rates = report["domains"][domain]["modes"][mode]["acceptance_per_position"]
            points = [(k + 1, r) for k, r in enumerate(rates) if r is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=labels[mode])
        ax.set_title(domain)
        ax.set_xticks(range(1, gamma + 1))
        ax.set_xlim(0.5, gamma + 0.5)
        ax.set_xlabel("draft position k")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(accept k | accepted < k)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "acceptance.png")
    _atomic_write(written[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bottom = [0.0] * len(modes)
    for stage in DECODE_STAGES:
        values = [report["domains"][ALL]["modes"][m]["stage_ms_per_token"][stage] for m in modes]
        ax.bar([labels[m] for m in modes], values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per generated token")
    ax.set_title("time per stage (all domains)")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    written.append(out_dir / "stages.png")
    _atomic_write(written[-1], lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return written


def default_out_dir(bundle: Path) -> Path:
    """`<bundle>/profile` when the bundle folder is writable, else `./dspark-profile`."""
    return bundle / "profile" if os.access(bundle, os.W_OK) else Path("dspark-profile")
