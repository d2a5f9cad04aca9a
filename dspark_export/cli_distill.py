"""`dspark-export distill`: train a DSpark (or DFlash) drafter for a target (see distill.py).

Registered in the main group by `dspark_export.cli` (`main.add_command(distill)`).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

DIR = click.Path(file_okay=False, path_type=Path)
FILE = click.Path(dir_okay=False, path_type=Path)


def _layer_ids(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _mix(ctx, param, value):
    if value is None:
        return None
    mix = {}
    for part in value.replace(" ", "").split(","):
        name, _, weight = part.partition("=")
        try:  # no "=" leaves weight empty, which float() refuses too
            mix[name] = float(weight)
        except ValueError:
            raise click.BadParameter(f"expected SOURCE=WEIGHT pairs, got {part!r}") from None
    return mix


@click.command("distill")
@click.option("--target", "target_dir", type=DIR, default=None,
              help="Hugging Face target folder (default: the reference SmolLM2-135M-Instruct).")
@click.option("--out", "out_dir", type=DIR, required=True,
              help="Folder for the drafter (config.json, model.safetensors, training.json).")
@click.option("--block-size", default=7, show_default=True, type=click.IntRange(min=2),
              help="Draft block size gamma.")
@click.option("--layers", "num_layers", default=1, show_default=True,
              type=click.IntRange(min=1), help="Draft decoder layers.")
@click.option("--markov-rank", default=64, show_default=True, type=click.IntRange(min=0),
              help="Markov head rank; 0 = no Markov head (DFlash).")
@click.option("--markov-head-type", default="vanilla", show_default=True,
              type=click.Choice(["vanilla", "gated", "rnn"]))
@click.option("--no-confidence-head", is_flag=True, help="Train without the confidence head.")
@click.option("--dflash", is_flag=True,
              help="DeepSpec's DFlash recipe: Markov rank 0, no confidence head, CE loss only.")
@click.option("--target-layer-ids", callback=_layer_ids, default=None,
              help="Comma-separated target layers to tap (default: the reference taps for "
                   "SmolLM2, else a DeepSpec-style spread; never the last layer).")
@click.option("--prompts", "prompts_file", type=FILE, default=None,
              help="Prompt file (jsonl with 'prompt' or 'turns', or one prompt a line) "
                   "instead of the built-in offline corpus.")
@click.option("--mix", callback=_mix, default=None,
              help="Weights of the built-in corpus's sources, e.g. "
                   "'math=0.3,code=0.2,code_tasks=0.4,chat=0.1' (code_tasks: typed functions "
                   "with doctests; default math 0.35, code 0.35, chat 0.3).")
@click.option("--data", "data_file", type=FILE, default=None,
              help="Generation data file to create, extend or reuse (default: in the cache).")
@click.option("--tokens", default=200_000, show_default=True, type=click.IntRange(min=1),
              help="Target response tokens to generate and train on.")
@click.option("--max-response-tokens", default=256, show_default=True,
              type=click.IntRange(min=1))
@click.option("--gen-batch-size", default=None, type=click.IntRange(min=1),
              help="Prompts per generate() call (default 256 on CUDA, 8 on CPU).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Optimiser steps.")
@click.option("--epochs", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Passes over the data (default 3 when --steps is not given).")
@click.option("--lr", default=6e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Sequences per step (default 32 on CUDA, 4 on CPU).")
@click.option("--anchors", default=None, type=click.IntRange(min=1),
              help="Anchors per sequence (default 64 on CUDA, 16 on CPU).")
@click.option("--ce-weight", default=None, type=click.FloatRange(min=0),
              help="Cross-entropy weight (DeepSpec: 0.1; 1.0 with --dflash).")
@click.option("--tv-weight", default=None, type=click.FloatRange(min=0),
              help="Weight of sum|p - q| = 2 TV (DeepSpec: 0.9; 0 with --dflash).")
@click.option("--confidence-weight", default=1.0, show_default=True,
              type=click.FloatRange(min=0), help="Confidence BCE weight.")
@click.option("--time-budget", "train_time_budget_s", default=None,
              type=click.FloatRange(min=0, min_open=True),
              help="Stop training after this many seconds (the LR schedule follows time).")
@click.option("--gen-time-budget", "gen_time_budget_s", default=None,
              type=click.FloatRange(min=0, min_open=True),
              help="Stop generating data after this many seconds.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto: bf16 autocast on CUDA and on CPUs with AMX, else fp32.")
@click.option("--draft-vocab", default=0, show_default=True, type=click.IntRange(min=0),
              help="Train for a draft vocabulary of the N most frequent answer tokens "
                   "(deploy with the same size: a profile's draft_vocab); 0 = full vocabulary.")
@click.option("--init", "init_from", type=DIR, default=None,
              help="Start from this drafter's weights (same architecture) and train it further.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--no-resume", is_flag=True, help="Ignore checkpoints in OUT/.checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace a finished drafter in OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def distill(target_dir, out_dir, block_size, num_layers, markov_rank, markov_head_type,
            no_confidence_head, dflash, target_layer_ids, prompts_file, mix, data_file, tokens,
            max_response_tokens, gen_batch_size, steps, epochs, lr, batch_size, anchors,
            ce_weight, tv_weight, confidence_weight, train_time_budget_s, gen_time_budget_s,
            device, dtype, draft_vocab, init_from, seed, checkpoint_every, no_resume, overwrite,
            quiet) -> None:
    """Train a DSpark drafter on the target's own answers (DeepSpec's objective), resumably."""
    from dspark_export.distill import CE_WEIGHT, TV_WEIGHT, DistillError
    from dspark_export.distill import distill as run_distill
    from dspark_export.distill_data import DistillDataError
    from dspark_export.models.draft import DraftError
    from dspark_export.models.target import TargetError

    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    if dflash:
        markov_rank, no_confidence_head = 0, True
        ce_weight = 1.0 if ce_weight is None else ce_weight
        tv_weight = 0.0 if tv_weight is None else tv_weight
    ce_weight = CE_WEIGHT if ce_weight is None else ce_weight
    tv_weight = TV_WEIGHT if tv_weight is None else tv_weight
    command = shlex.join(["dspark-export", *sys.argv[1:]])
    try:
        out = run_distill(
            target_dir, out_dir, block_size=block_size, num_layers=num_layers,
            markov_rank=markov_rank, markov_head_type=markov_head_type,
            confidence_head=not no_confidence_head, target_layer_ids=target_layer_ids,
            tokens=tokens, prompts_file=prompts_file, mix=mix, data_file=data_file,
            max_response_tokens=max_response_tokens, gen_batch_size=gen_batch_size,
            epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, anchors=anchors,
            ce_weight=ce_weight, tv_weight=tv_weight,
            confidence_weight=0.0 if no_confidence_head else confidence_weight,
            device=device, dtype=dtype, seed=seed, resume=not no_resume, overwrite=overwrite,
            progress=not quiet, checkpoint_every=checkpoint_every, draft_vocab=draft_vocab,
            init_from=init_from,
            gen_time_budget_s=gen_time_budget_s, train_time_budget_s=train_time_budget_s,
            command=command, log=click.echo,
        )
    except (DistillError, DistillDataError, DraftError, TargetError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out}")
