"""`dspark-export build`: export -> backend build -> SPS profiling -> bundle, with progress bars.

Everything that can refuse the build (the profile, the destination, the backend's builder and,
for full TensorRT, the GPU) is checked before the export starts; the backend's builder comes
from the registry in dspark_runtime.backends, and every file is staged by `BundleWriter`, so a failed or
interrupted build leaves neither a bundle nor a temporary folder behind.
"""
from __future__ import annotations

import json
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
from dspark_runtime.backends import get_backend, get_builder
from dspark_runtime.bundle import GRAPH_NAMES, shapes_from_export

SPS_REPEATS = 5


def build_bundle(profile: Profile, target_dir: str | Path | None, draft_dir: str | Path | None,
                 out_dir: str | Path, *, progress: bool = True,
                 draft_vocab: int | None = None) -> Path:
    """Build a bundle for `profile` at `out_dir` (None dirs: the embedded reference pair).
    `draft_vocab` overrides the profile's (0: the full vocabulary)."""
    builder = get_builder(profile.backend)
    builder.require(profile)  # before anything is written
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
            backend = builder.build(export_dir, profile, writer.root, GRAPH_NAMES,
                                    lambda _: advance())
        shutil.rmtree(export_dir)  # free the disk before profiling

        unmeasurable = builder.sps_unmeasurable(profile)
        if unmeasurable is None:
            _profile_sps(steps, writer, profile, info, builder.timing_section(backend))

        with steps.step("bundle", 1) as advance:
            writer.write_manifest(profile=profile, export_info=info, **backend,
                                  notes={"sps_table": unmeasurable} if unmeasurable else None)
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


def _profile_sps(steps: _Steps, writer: BundleWriter, profile: Profile, info: dict[str, Any],
                 section: dict[str, Any]) -> None:
    """Time target verify steps on the built graph and write sps_table.json."""
    shapes = shapes_from_export(info, profile.max_batch, profile.max_context)
    counts = default_token_counts(profile.verify_tokens_max(int(info["gamma"])))
    with steps.step("SPS profiling", len(counts)) as advance:
        runner, device = get_backend(profile.backend).timing_runner(writer.root, section)
        try:
            table = measure_sps(runner, shapes, counts, SPS_REPEATS,
                                precision=profile.precision, device=device,
                                backend=profile.backend, on_point=lambda _: advance())
        finally:
            runner.close()
    writer.write_json("sps_table.json", table)


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
