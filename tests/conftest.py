"""Shared fixtures: tiny random targets of each supported family, the tiny exported pair, the
reference pair, and a stand-in for this machine's GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_VOCAB = 256


def make_tiny_target(out_dir: Path, family: str = "llama", *, vocab: int = TINY_VOCAB, seed: int = 0) -> Path:
    """Save a seeded random 4-layer causal LM of `family` (llama|qwen2|qwen3|mistral)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    from tokenizers import Tokenizer, models, pre_tokenizers

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                  "mistral": MistralConfig}[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    if family == "qwen2":
        extra["use_sliding_window"] = False
    config = config_cls(**common, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # larger weights give peaked, less tie-prone logits
            p.mul_(4.0) if p.ndim > 1 else None
    model.save_pretrained(out_dir)
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab_map.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory) -> dict[str, Path]:
    """One tiny random target folder per supported family."""
    root = tmp_path_factory.mktemp("targets")
    return {f: make_tiny_target(root / f, f) for f in ("llama", "qwen2", "qwen3", "mistral")}


@pytest.fixture(scope="session")
def reference_target() -> Path:
    from dspark_export.reference import reference_target_dir

    return reference_target_dir()


def export_tiny_pair(root: Path, precision: str = "fp32") -> Path:
    """A tiny llama target + random 1-layer drafter (gamma 4), exported once per session under
    `root` (folders `runtime_tiny_target`, `runtime_tiny_draft`, and the export)."""
    out = root / ("runtime_tiny_export" if precision == "fp32" else f"tiny_export_{precision}")
    if (out / "export.json").is_file():
        return out
    from transformers import AutoConfig

    from dspark_export.export import export_graphs
    from dspark_export.models.draft import make_random_drafter, save_drafter

    target, draft = root / "runtime_tiny_target", root / "runtime_tiny_draft"
    if not (draft / "config.json").is_file():
        make_tiny_target(target, "llama")
        drafter = make_random_drafter(AutoConfig.from_pretrained(target), num_layers=1,
                                      block_size=4, target_layer_ids=[0, 2], seed=0)
        save_drafter(drafter, draft)
    return export_graphs(target, draft, out, precision=precision)


@pytest.fixture(scope="session")
def tiny_cpu_bundle(tmp_path_factory) -> Path:
    """A cpu-profile bundle (`build_bundle`: ORT optimisation, SPS profiling, manifest) of the
    tiny llama target + random drafter (gamma 4) that test_runtime exports once per session;
    the export step copies that export instead of running torch.onnx again."""
    import shutil
    import sys
    import types

    from dspark_export.build.pipeline import build_bundle
    from dspark_export.build.profiles import load_profile

    export = export_tiny_pair(tmp_path_factory.getbasetemp())

    def cached_export(target_dir, draft_dir, out_dir, *, precision="fp32", opset=18,
                      on_step=lambda name: None, draft_vocab=0):
        assert precision == "fp32"
        for step in ("load", "target", "draft", "markov", "verify", "tokenizer"):
            on_step(step)
        return Path(shutil.copytree(export, out_dir))

    module = types.ModuleType("dspark_export.export")
    module.export_graphs = cached_export
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "dspark_export.export", module)
        return build_bundle(load_profile("cpu"), None, None,
                            tmp_path_factory.mktemp("tiny_cpu") / "bundle", progress=False)


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Call with {"name", "compute_capability"} (or None) to make `dspark_runtime.gpu` report
    that GPU (a FAKE: for refusal and bookkeeping tests; nothing runs on it)."""
    from dspark_runtime import gpu

    def pretend(info: dict[str, str] | None) -> None:
        monkeypatch.setattr(gpu, "_from_cuda_python", lambda device=0: info)
        monkeypatch.setattr(gpu, "_from_libcudart", lambda device=0: info)

    return pretend
