"""`dspark-export profile BUNDLE`: tau, acceptance per position, tokens/s and time per stage for
target-only, DSpark fixed gamma, DSpark scheduled and an MTP-1-style budget, per domain."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("profile")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompts", "prompt_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Prompt file (repeatable), one domain each, named after the file: JSON lines "
                   "with 'turns' (first turn), 'prompt' or 'text', or one prompt a line. "
                   "Default: ../shared/eval gsm8k (math), humaneval (code), mt-bench (chat).")
@click.option("--per-domain", default=20, show_default=True, type=click.IntRange(min=1),
              help="Prompts per domain (the first N of each file).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where profile.json and the PNG plots go "
                   "(default: BUNDLE/profile, or ./dspark-profile if BUNDLE is read-only).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime device (auto: CUDA when available).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: the bundle's setting).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as one JSON object instead of the tables.")
def profile(bundle: Path, prompt_files: tuple[Path, ...], per_domain: int, max_new_tokens: int,
            temperature: float, seed: int, out_dir: Path | None, backend: str,
            threads: int | None, as_json: bool) -> None:
    """Profile a bundle per domain: four decoding modes through the same runtime, interleaved
    prompt by prompt; prints tables, writes profile.json and PNG plots."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from dspark_export.profile import (MODES, ProfileError, default_out_dir, format_tables,
                                       load_eval_prompts, profile_bundle, write_json, write_plots)
    from dspark_runtime.bundle import BundleError
    from dspark_runtime.pipeline import Pipeline

    try:
        prompts = load_eval_prompts(per_domain, prompt_files)
        pipe = Pipeline.from_bundle(bundle, backend=backend, threads=threads)
    except (ProfileError, BundleError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    out_dir = out_dir or default_out_dir(bundle)
    if out_dir.exists() and not out_dir.is_dir():
        raise click.ClickException(f"--out {out_dir}: exists and is not a folder")

    total = sum(len(p["prompts"]) for p in prompts.values()) * len(MODES)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=as_json) as progress:
        task = progress.add_task("profile: warm-up", total=total)

        def advance(domain: str, index: int, mode: str, result) -> None:
            progress.update(task, advance=1, description=f"profile: {domain} #{index + 1} {mode}")
            if not console.is_terminal:  # a log file gets one line per generation instead
                console.print(f"{domain} #{index + 1} {mode}: {result.new_tokens} tokens, "
                              f"{result.tokens_per_s:.1f} tokens/s, tau {result.tau:.2f}",
                              highlight=False)

        try:
            report = profile_bundle(pipe, prompts, bundle=str(bundle),
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=seed, threads=threads, on_result=advance)
        except ProfileError as exc:
            raise click.ClickException(str(exc)) from exc
    try:
        files = [write_json(report, out_dir / "profile.json"), *write_plots(report, out_dir)]
    except OSError as exc:
        raise click.ClickException(f"--out {out_dir}: cannot write ({exc})") from exc
    if as_json:
        click.echo(json.dumps(report))
        return
    settings = report["settings"]
    click.echo(f"bundle {bundle}: gamma {settings['gamma']}, scheduler {settings['scheduler']}, "
               f"{settings['per_domain']} prompts per domain, {settings['max_new_tokens']} new "
               f"tokens, temperature {settings['temperature']:g}, batch 1, "
               f"{report['wall_s']:.0f} s\n")
    click.echo(format_tables(report))
    click.echo("\nwrote " + ", ".join(str(f) for f in files))
