"""`serve BUNDLE`: the OpenAI-compatible server (`dspark-export serve`, or `dspark-serve`, which
needs no torch)."""
from __future__ import annotations

from pathlib import Path

import click

from ..schedule import AUTO, SCHEDULER_NAMES

DEFAULT_CONTEXT = 4096


@click.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="KV-cache slots: requests decoded together (default: the bundle's max batch).")
@click.option("--max-context", type=click.IntRange(min=16), default=None,
              help=f"Cache positions per slot, prompt and reply (default: the bundle's context, "
                   f"at most {DEFAULT_CONTEXT}).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a slot; beyond it: 503 with Retry-After.")
@click.option("--api-key", default=None, envvar="DSPARK_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (or set DSPARK_API_KEY).")
@click.option("--model-name", default=None, help="The model id clients ask for "
              "(default: the bundle folder's name).")
@click.option("--schedule", type=click.Choice((AUTO, *SCHEDULER_NAMES)), default=AUTO,
              show_default=True, help="Verify-length scheduler (auto: hardware-aware with the "
              "bundle's SPS table).")
@click.option("--target-only", is_flag=True, help="Serve the target alone (no drafting).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="ONNX Runtime device.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: the bundle's setting).")
def serve(bundle: Path, host: str, port: int, max_batch: int | None, max_context: int | None,
          max_queue: int, api_key: str | None, model_name: str | None, schedule: str,
          target_only: bool, backend: str, threads: int | None) -> None:
    """Serve a bundle over an OpenAI-compatible HTTP API with continuous batching."""
    import uvicorn

    from ..bundle import BundleError
    from ..pipeline import Pipeline
    from .app import create_app
    from .async_engine import AsyncEngine
    from .metrics import ServerMetrics

    try:
        pipe = Pipeline.from_bundle(bundle, backend=backend, threads=threads, schedule=schedule)
    except (BundleError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    slots = max_batch or int(pipe.max_batch or 8)
    capacity = min(max_context or DEFAULT_CONTEXT, pipe.context_limit)
    metrics = ServerMetrics(0 if target_only else pipe.gamma)
    engine = AsyncEngine(pipe, max_batch=slots, capacity=capacity, max_queue=max_queue,
                         target_only=target_only, metrics=metrics)
    name = model_name or Path(bundle).resolve().name
    app = create_app(engine, metrics, model_name=name, api_key=api_key)
    click.echo(f"serving {name} ({'target-only' if target_only else f'DSpark, {pipe.schedule}'}"
               f", {slots} slots x {capacity} positions) on http://{host}:{port}/v1 "
               f"(metrics: /metrics)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main() -> None:
    serve()


if __name__ == "__main__":
    main()
