"""`dspark-export calibrate BUNDLE`: fit STS on the bundle's own drafts, write calibration.json."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("calibrate")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Calibration prompts: jsonl ('prompt' or 'turns') or one per "
              "line (default: the offline corpus; files under shared/eval/ are refused).")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Prompts to run (default 64 from the corpus; with --prompts, the first N).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Verification temperature the calibration targets (0: greedy).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Corpus and sampling seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Requests per batch (default: min(8, the bundle's max_batch)).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime device (auto: CUDA when available).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: the bundle's setting).")
@click.option("--save-rounds", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the recorded rounds (logits, accepted, verified) as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def calibrate(bundle: Path, prompts_file: Path | None, num_prompts: int | None,
              max_new_tokens: int, temperature: float, seed: int, batch_size: int | None,
              backend: str, threads: int | None, save_rounds: Path | None,
              as_json: bool) -> None:
    """Calibrate the bundle's confidence head (STS) and record calibration.json in it.

    Runs the bundle on calibration prompts with the full-block schedule, records each round's
    raw confidence logits and accepted prefix, fits one temperature per position (left to
    right, minimising the ECE of the cumulative product), writes calibration.json atomically
    and re-hashes it into the manifest. The runtime applies it when it loads the bundle. The
    calibration targets acceptance at --temperature: calibrate at the temperature you serve.
    """
    from dspark_export.calibrate import (CalibrationError, calibrate_bundle,
                                         calibration_prompts, check_calibratable,
                                         format_report)
    from dspark_runtime.bundle import BundleError
    from dspark_runtime.pipeline import PromptError

    try:
        check_calibratable(bundle)  # before building any prompt
        prompts, source = calibration_prompts(prompts_file, num_prompts, seed)

        def progress(done: int, total: int, part) -> None:
            click.echo(f"batch {done}/{total}: {len(part)} rounds, tau {part.tau():.2f}",
                       err=True)

        calibration, rounds = calibrate_bundle(
            bundle, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            batch_size=batch_size, backend=backend, threads=threads, prompt_source=source,
            on_batch=None if as_json else progress)
    except (CalibrationError, BundleError, PromptError, FileNotFoundError, ValueError,
            RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if save_rounds is not None:
        rounds.save(save_rounds, bundle=str(bundle), prompts=source)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "rounds": len(rounds), "tau": rounds.tau(),
                               **calibration.to_json()}))
        return
    rates = " ".join("-" if r != r else f"{r:.2f}" for r in rounds.acceptance_per_position())
    click.echo(f"{len(rounds)} rounds from {source['n_prompts']} prompts, temperature "
               f"{temperature:g}, tau {rounds.tau():.2f}, acceptance per position: {rates}")
    click.echo(format_report(calibration))
    click.echo(f"wrote {Path(bundle) / 'calibration.json'} (manifest updated)")
