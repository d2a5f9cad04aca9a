"""`dspark-export`: one click group for the whole pipeline (load -> export -> build -> run -> profile)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from dspark_export import __version__
from dspark_export.cli_calibrate import calibrate as calibrate_command
from dspark_export.cli_distill import distill as distill_command
from dspark_export.cli_profile import profile as profile_command
from dspark_export.cli_run import run as run_command
from dspark_runtime.server.cli import serve as serve_command

DIR = click.Path(file_okay=False, path_type=Path)
TARGET_HELP = "Hugging Face target model folder (default: the reference SmolLM2-135M-Instruct)."
DRAFT_HELP = "DeepSpec-format DSpark/DFlash drafter folder (default: the reference drafter)."
DRAFT_VOCAB_HELP = ("Draft over only the N tokens the target emits most (the drafter's "
                    "token_counts.json); 0: the full vocabulary. Verification stays lossless.")


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


@main.command()
@click.option("--target", "target_dir", type=DIR, default=None, help=TARGET_HELP)
@click.option("--draft", "draft_dir", type=DIR, default=None, help=DRAFT_HELP)
@click.option("--out", "out_dir", type=DIR, required=True, help="Folder to write the graphs into.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(min=18), default=18, show_default=True)
@click.option("--draft-vocab", type=click.IntRange(min=0), default=0, show_default=True,
              help=DRAFT_VOCAB_HELP)
def export(target_dir, draft_dir, out_dir, precision, opset, draft_vocab) -> None:
    """Trace the pair into target/draft/markov/verify ONNX graphs plus export.json."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from dspark_export.export import export_graphs

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        task = progress.add_task("export", total=None)
        try:
            out = export_graphs(target_dir, draft_dir, out_dir, precision=precision, opset=opset,
                                draft_vocab=draft_vocab, on_step=lambda name: progress.update(task, description=f"export: {name}"))
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out}")


@main.command()
@click.option("--profile", "profile_name", default="cpu", show_default=True,
              help="A shipped profile name (see `dspark-export profiles`) or a path to a YAML file.")
@click.option("--target", "target_dir", type=DIR, default=None, help=TARGET_HELP)
@click.option("--draft", "draft_dir", type=DIR, default=None, help=DRAFT_HELP)
@click.option("--out", "out_dir", type=DIR, default=Path("dspark-bundle"), show_default=True)
@click.option("--draft-vocab", type=click.IntRange(min=0), default=None,
              help=DRAFT_VOCAB_HELP + " Default: the profile's draft_vocab.")
def build(profile_name, target_dir, draft_dir, out_dir, draft_vocab) -> None:
    """Export, compile for a hardware profile, measure SPS(B) and write a bundle."""
    from dspark_export.build.pipeline import build_bundle
    from dspark_export.build.profiles import ProfileError, load_profile
    from dspark_export.build.tensorrt_build import TensorRTBuildError
    from dspark_runtime.backends import BackendUnavailable

    try:
        profile = load_profile(profile_name)
        out = build_bundle(profile, target_dir, draft_dir, out_dir, draft_vocab=draft_vocab)
    except (ProfileError, BackendUnavailable, TensorRTBuildError, ValueError,
            FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle: {out}  (next: dspark-export run {out} --prompt \"...\")")


@main.command()
def profiles() -> None:
    """List the shipped hardware profiles."""
    from dspark_export.build.profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        click.echo(f"{name:<12} {p.backend:<12} {p.precision:<5} batch<={p.max_batch:<4} "
                   f"context<={p.max_context:<6} {p.description}")


@main.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the verdict as JSON.")
def inspect(bundle, as_json) -> None:
    """Show a bundle's manifest and whether this machine can run it."""
    from dspark_runtime.bundle import BundleError, check_compatibility, read_manifest, verify_files

    try:
        manifest = read_manifest(bundle)
        problems = check_compatibility(manifest)
        try:
            if manifest.get("files"):
                verify_files(bundle, manifest)
        except BundleError as exc:
            problems.append(str(exc))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"manifest": manifest, "runnable": not problems, "problems": problems}))
        return
    shapes = manifest.get("shapes", {})
    graph_files = ", ".join(f"{name}={g['file']}" for name, g in manifest.get("graphs", {}).items())
    click.echo(f"bundle       {bundle}")
    click.echo(f"format       {manifest.get('format_version')}  profile {manifest.get('profile_name')}  "
               f"backend {manifest.get('backend')}  precision {manifest.get('precision')}")
    click.echo(f"shapes       gamma {shapes.get('gamma')}  max batch {shapes.get('max_batch')}  "
               f"max context {shapes.get('max_context')}  vocab {shapes.get('vocab_size')}")
    click.echo(f"graphs       {graph_files}")
    click.echo(f"sps table    {manifest.get('sps_table')}  calibration {manifest.get('calibration')}")
    for tool, version in (manifest.get("tools") or {}).items():
        click.echo(f"  {tool:<12} {version}")
    for key, why in (manifest.get("notes") or {}).items():
        click.echo(f"note         no {key}: {why}")
    if manifest.get("tensorrt"):
        _echo_engines(manifest["tensorrt"])
    click.echo("runnable here: yes" if not problems else "runnable here: NO\n  " + "\n  ".join(problems))


def _echo_engines(info: dict) -> None:
    """What a TensorRT bundle's manifest knows of its engines (no GPU needed to read it)."""
    targets = ", ".join(info.get("compute_capabilities") or [str(info.get("compute_capability"))])
    click.echo(f"engines      {info.get('builder', 'TensorRT')} {info.get('version')}  targets "
               f"{targets}  strongly typed {info.get('strongly_typed')}  SpecVerify "
               f"{info.get('spec_verify', 'plugin')}")
    for name, engine in (info.get("engines") or {}).items():
        size = engine.get("bytes")
        layers = f"{engine.get('network_layers')} network / {engine.get('engine_layers')} engine"
        click.echo(f"  {name:<8} {engine['file']:<15} "
                   f"{'?' if size is None else f'{size / 2**20:.1f} MiB':>10}  layers {layers}")
        for kind in ("inputs", "outputs"):
            tensors = engine.get(kind) or []
            click.echo(f"    {kind:<8} " + ", ".join(
                f"{t['name']} {t['dtype']}{t['shape']}" for t in tensors))
        for p in engine.get("optimization_profiles") or []:
            ranges = ", ".join(f"{t} {r[0]}..{r[2]}" for t, r in p["shapes"].items()
                               if r[0] != r[2])
            click.echo(f"    profile  {p['name']}: {ranges}")


main.add_command(run_command)
main.add_command(calibrate_command)
main.add_command(distill_command)
main.add_command(profile_command)
main.add_command(serve_command)


if __name__ == "__main__":
    main()
