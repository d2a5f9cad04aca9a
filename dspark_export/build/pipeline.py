"""`dspark-export build`: export -> backend build -> SPS profiling -> bundle, with progress bars.

Everything that can refuse the build (the profile, the destination, TensorRT and the GPU) is
checked before the export starts, and every file is staged by `BundleWriter`, so a failed or
interrupted build leaves neither a bundle nor a temporary folder behind.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dspark_export.build.bundle_writer import BundleWriter
from dspark_export.build.profiles import Profile
from dspark_export.build.sps_profiling import default_token_counts, measure_sps
from dspark_runtime.backends.base import Runner
from dspark_runtime.bundle import GRAPH_NAMES, shapes_from_export

SPS_REPEATS = 5


def build_bundle(profile: Profile, target_dir: str | Path | None, draft_dir: str | Path | None,
                 out_dir: str | Path, *, progress: bool = True,
                 draft_vocab: int | None = None) -> Path:
    """Build a bundle for `profile` at `out_dir` (None dirs: the embedded reference pair).
    `draft_vocab` overrides the profile's (0: the full vocabulary)."""
    if profile.backend == "tensorrt":
        from dspark_export.build.tensorrt_build import require_tensorrt

        require_tensorrt(profile)  # before anything is written
    if draft_vocab is None:
        draft_vocab = _profile_draft_vocab(profile, draft_dir)
    from dspark_export.export import export_graphs  # torch: only once the build can go ahead
    out_dir = Path(out_dir)
    with _Steps(progress) as steps, BundleWriter(out_dir) as writer, \
            tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-",
                                        dir=writer.root.parent) as scratch:
        export_dir = Path(scratch) / "export"
        with steps.step(f"export ({profile.precision})", len(GRAPH_NAMES) + 2) as advance:
            export_graphs(None if target_dir is None else Path(target_dir),
                          None if draft_dir is None else Path(draft_dir), export_dir,
                          precision=profile.precision, draft_vocab=draft_vocab,
                          on_step=lambda _: advance())
        info = json.loads((export_dir / "export.json").read_text(encoding="utf-8"))
        profile.check_gamma(int(info["gamma"]))
        writer.add_file(export_dir / "export.json")
        writer.add_file(export_dir / "tokenizer")

        with steps.step(f"{profile.backend} build", len(GRAPH_NAMES)) as advance:
            backend = _build_backend(profile, export_dir, writer.root, lambda _: advance())
        shutil.rmtree(export_dir)  # free the disk before profiling

        shapes = shapes_from_export(info, profile.max_batch, profile.max_context)
        counts = default_token_counts(profile.verify_tokens_max(int(info["gamma"])))
        with steps.step("SPS profiling", len(counts)) as advance:
            runner, device = _target_runner(profile, writer.root, backend["session_options"])
            try:
                table = measure_sps(runner, shapes, counts, SPS_REPEATS,
                                    precision=profile.precision, device=device,
                                    backend=profile.backend, on_point=lambda _: advance())
            finally:
                runner.close()
        writer.write_json("sps_table.json", table)

        with steps.step("bundle", 1) as advance:
            writer.write_manifest(profile=profile, export_info=info, **backend)
            advance()
    return out_dir


def _profile_draft_vocab(profile: Profile, draft_dir: str | Path | None) -> int:
    """The profile's draft vocabulary size, or 0 (with a warning) for a drafter that has no
    token counts to choose it from: a profile default must not refuse other drafters."""
    if not profile.draft_vocab:
        return 0
    from dspark_export.models.draft_vocab import TOKEN_COUNTS_NAME
    from dspark_export.reference import reference_draft_dir

    counts = Path(draft_dir or reference_draft_dir()) / TOKEN_COUNTS_NAME
    if counts.is_file():
        return profile.draft_vocab
    warnings.warn(f"profile {profile.name}: draft_vocab {profile.draft_vocab} needs {counts} "
                  "(written by `dspark-export distill`); drafting over the full vocabulary")
    return 0


def _build_backend(profile: Profile, export_dir: Path, root: Path, on_graph: Any) -> dict:
    """The backend's files in the bundle, and what the manifest records about them."""
    if profile.backend == "onnxruntime":
        from dspark_export.build.onnxruntime_build import optimize_graphs

        options = optimize_graphs(export_dir, profile, root, GRAPH_NAMES, on_graph)
        return {"graphs": {n: f"{n}.onnx" for n in GRAPH_NAMES}, "session_options": options,
                "tensorrt": None}
    from dspark_export.build.tensorrt_build import build_engines

    trt_info = build_engines(export_dir, profile, root, on_graph)
    return {"graphs": {n: e["file"] for n, e in trt_info["engines"].items()},
            "session_options": None, "tensorrt": trt_info}


def _target_runner(profile: Profile, root: Path,
                   options: dict[str, Any] | None) -> tuple[Runner, str]:
    """A runner over the bundle's target graph, and the name of the device it runs on."""
    if profile.backend == "onnxruntime":
        import onnxruntime as ort

        from dspark_export.build.onnxruntime_build import DeviceTimedRunner, cuda_device_name
        from dspark_runtime.backends.onnxruntime import OnnxRuntimeRunner, session_options

        available = ort.get_available_providers()
        missing = [p for p in options["providers"] if p not in available]
        providers = [p for p in options["providers"] if p in available]
        if "CUDAExecutionProvider" in providers:
            # Same provider options as the runtime (TF32 off), and its CUDA libraries loaded.
            from dspark_runtime.backends.onnxruntime import default_providers

            providers = default_providers("cuda", options["providers"])
        runner = OnnxRuntimeRunner(root / "target.onnx", providers=providers or None,
                                   session_options=session_options(options))
        first = runner.session.get_providers()[0]
        if first == "CUDAExecutionProvider":
            # Time the graph with the KV caches on the GPU, as the runtime runs it.
            return DeviceTimedRunner(runner), cuda_device_name()
        device = f"CPU ({platform.machine()}, {os.cpu_count()} threads)"
        if missing:
            device += f"; {', '.join(missing)} not available at build time"
            warnings.warn(f"profile {profile.name}: {', '.join(missing)} is not offered by this "
                          f"onnxruntime ({', '.join(available)}); the graphs are portable, but "
                          f"SPS(B) was measured on the CPU provider (recorded in sps_table.json)"
                          "; rebuild on the target machine for a hardware-aware schedule",
                          stacklevel=2)
        return runner, device
    from dspark_runtime.backends.tensorrt import TensorRTRunner, gpu_info

    return TensorRTRunner(root / "target.engine"), gpu_info()["name"]


class _Steps:
    """One rich progress bar per build step (silent when `enabled` is false)."""

    def __init__(self, enabled: bool):
        self.progress = Progress(TextColumn("{task.description:<24}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled)

    def __enter__(self) -> _Steps:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    @contextmanager
    def step(self, description: str, total: int) -> Iterator[Any]:
        task = self.progress.add_task(description, total=total)
        yield lambda: self.progress.advance(task)
        self.progress.update(task, completed=total)
