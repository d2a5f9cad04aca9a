"""`dspark-export run BUNDLE --prompt TEXT`: stream text from a bundle through dspark_runtime."""
from __future__ import annotations

import json
from pathlib import Path

import click
from dspark_runtime.schedule import AUTO, SCHEDULER_NAMES


def _summary(result, schedule: str) -> str:
    """The stats lines printed after the streamed text."""
    stages = "  ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in result.seconds.items())
    rates = " ".join("-" if r != r else f"{r:.2f}"
                     for r in result.requests[0].acceptance_per_position())
    return (f"[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, "
            f"tau {result.tau:.2f}, {result.steps} steps, schedule {schedule}, "
            f"host overhead {100 * result.host_overhead:.1f}%]\n"
            f"[time per stage, ms: {stages}]\n"
            f"[acceptance per position: {rates or '-'}]")


@click.command("run")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="User message (chat template applied unless --raw).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--schedule", type=click.Choice((AUTO, *SCHEDULER_NAMES)), default=AUTO,
              show_default=True, help="How many drafts the target verifies per step (auto: "
              "hardware when the bundle has an SPS table, else threshold).")
@click.option("--threshold", default=None, type=click.FloatRange(0.0, 1.0),
              help="Confidence threshold of --schedule threshold (default 0.5).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime device (auto: CUDA when available).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: the bundle's setting).")
@click.option("--target-only", is_flag=True,
              help="Decode with the target alone (same loop, gamma 0).")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def run(bundle: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int,
        schedule: str, threshold: float | None, backend: str, threads: int | None,
        target_only: bool, raw: bool, as_json: bool) -> None:
    """Generate from a bundle (or an export folder), streaming the text, then the stats."""
    if not prompt.strip():
        raise click.ClickException("the prompt is empty")
    from dspark_runtime.bundle import BundleError
    from dspark_runtime.pipeline import Pipeline, PromptError
    from dspark_runtime.schedule import DEFAULT_THRESHOLD

    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, threads=threads, schedule=schedule,
                                    threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
        prompt_ids = pipe.encode([prompt], raw=raw)
    except (BundleError, PromptError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc

    def stream(_: int, text: str) -> None:
        click.echo(text, nl=False)

    result = pipe.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           seed=seed, target_only=target_only,
                           stream=None if as_json else stream)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo("\n")
    click.echo(_summary(result, "target-only" if target_only else pipe.schedule))
