"""`dspark-export`: one click group for the whole pipeline (load -> export -> build -> run -> profile)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from dspark_export import __version__

DIR = click.Path(file_okay=False, path_type=Path)
TARGET_HELP = "Hugging Face target model folder (default: the reference SmolLM2-135M-Instruct)."
DRAFT_HELP = "DeepSpec-format DSpark/DFlash drafter folder (default: the reference drafter)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dspark-export")
def main() -> None:
    """Export, compile, run and profile DSpark speculative decoding."""


@main.command()
def reference() -> None:
    """Print the reference pair's folders, converting the target on first use."""
    from dspark_export.pair import resolve_dirs

    target_dir, draft_dir = resolve_dirs(None, None)
    click.echo(f"target: {target_dir}")
    click.echo(f"draft:  {draft_dir}")


@main.command()
@click.option("--target", "target_dir", type=DIR, default=None, help=TARGET_HELP)
@click.option("--draft", "draft_dir", type=DIR, default=None, help=DRAFT_HELP)
@click.option("--prompt", required=True, help="User message (chat template applied unless --raw).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threshold", default=None, type=click.FloatRange(0.0, 1.0),
              help="Static confidence threshold (default: verify the whole block).")
@click.option("--target-only", is_flag=True, help="Decode with the target alone.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def generate(target_dir, draft_dir, prompt, max_new_tokens, temperature, seed, threshold,
             target_only, raw, as_json) -> None:
    """Reference decoding in eager PyTorch (the ground truth for every backend)."""
    from dspark_export.decode import generate_speculative, generate_target_only
    from dspark_export.models.draft import DraftError
    from dspark_export.models.target import TargetError
    from dspark_export.pair import load_pair
    from dspark_runtime.schedule import ThresholdScheduler

    try:
        pair = load_pair(target_dir, draft_dir)
        prompt_ids = pair.encode_prompt(prompt, raw)
    except (TargetError, DraftError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                  stop_ids=pair.stop_ids())
    if target_only:
        result = generate_target_only(pair.target, prompt_ids, **common)
    else:
        scheduler = None if threshold is None else ThresholdScheduler(threshold)
        result = generate_speculative(pair.target, pair.drafter, prompt_ids, scheduler=scheduler, **common)
    text = pair.tokenizer.decode(result.tokens, skip_special_tokens=True)
    stats = result.stats.to_dict()
    if as_json:
        click.echo(json.dumps({"text": text, "tokens": result.tokens, **stats}))
        return
    click.echo(text)
    rates = " ".join(f"{r:.2f}" for r in stats["acceptance_per_position"])
    click.echo(
        f"\n[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
        f"tau {stats['tau']:.2f}, acceptance per position: {rates or '-'}]"
    )


if __name__ == "__main__":
    main()
