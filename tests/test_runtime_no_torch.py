"""dspark_runtime imports and generates where torch and transformers cannot be imported."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import export_tiny_pair

# Installed before anything else runs in the child: any import of a blocked package fails.
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
""")

CHILD = BLOCKER + textwrap.dedent("""
    import json, pkgutil, importlib
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker failed: torch imported")
    import dspark_runtime
    found = pkgutil.walk_packages(dspark_runtime.__path__, "dspark_runtime.")
    modules = sorted(m.name for m in found)
    skipped = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # optional backends (tensorrt) may be absent here
            skipped[name] = str(exc)
    from dspark_runtime.pipeline import Pipeline
    result = None
    if len(sys.argv) > 1:
        out = Pipeline.from_bundle(sys.argv[1]).generate(["t5 t6 t7"], max_new_tokens=6)
        result = out.requests[0].token_ids
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print(json.dumps({"modules": modules, "skipped": skipped, "tokens": result, "leaked": leaked}))
""")


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_imports_without_torch():
    report = _child()
    assert "dspark_runtime.pipeline" in report["modules"]
    assert not report["leaked"]
    for name, reason in report["skipped"].items():  # only a missing optional backend is fine
        assert "torch" not in reason and "transformers" not in reason, (name, reason)
        assert name.startswith("dspark_runtime.backends."), (name, reason)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    return export_tiny_pair(tmp_path_factory.getbasetemp())


def test_tiny_pipeline_runs_without_torch(tiny_export):
    from dspark_runtime.pipeline import Pipeline

    report = _child(str(tiny_export))
    want = Pipeline.from_bundle(tiny_export).generate(["t5 t6 t7"], max_new_tokens=6)
    assert report["tokens"] == want.requests[0].token_ids
    assert not report["leaked"]


@pytest.mark.slow
def test_runtime_distribution_serves_from_a_venv_without_torch(tiny_export, tmp_path):
    """`pip install ./runtime[serve]` into a fresh venv (no torch there), then `dspark-serve`
    answers the openai client with what the runtime gives in this process."""
    openai = pytest.importorskip("openai", reason="the openai client comes with the dev extra")
    from test_server import _free_port

    from dspark_runtime.pipeline import Pipeline

    root = Path(__file__).resolve().parents[1]
    source = shutil.copytree(root / "runtime", tmp_path / "runtime",
                             ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{source}[serve]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    port = _free_port()
    server = subprocess.Popen(["timeout", "300", str(venv / "bin" / "dspark-serve"),
                               str(tiny_export), "--port", str(port), "--model-name", "tiny"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = client.completions.create(model="tiny", prompt="t5 t6 t7", max_tokens=6,
                                                  temperature=0)
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "dspark-serve did not start in 120 s"
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    with Pipeline.from_bundle(tiny_export) as pipe:
        want = pipe.generate([pipe.tokenizer.encode_prompt("t5 t6 t7", raw=True)],
                             max_new_tokens=6).requests[0]
    assert reply.choices[0].text == want.text
