"""Tokenisation from a bundle's tokenizer files, without transformers.

`tokenizer.json` runs through the `tokenizers` library; the chat template (a Jinja file or the
`chat_template` of `tokenizer_config.json`) is rendered with jinja2 in the same sandbox and with
the same options as Hugging Face's `apply_chat_template`, so the runtime feeds the target the
exact prompt tokens the PyTorch reference does.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

# End-of-turn markers of common chat templates; one that occurs in the template and is a single
# token becomes a stop id, so a chat reply ends where the template would close the turn.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: object) -> str | None:
    """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_list(value: object) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class TextTokenizer:
    """Encode prompts (optionally through the chat template), decode, and know the stop ids."""

    def __init__(self, directory: str | Path, stop_ids: list[int] | None = None) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a bundle needs its tokenizer files")
        self.tokenizer = Tokenizer.from_file(str(path))
        config = _read_json(directory / "tokenizer_config.json")
        self.special_tokens = {k: _token_text(config.get(k))
                               for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template_file = directory / "chat_template.jinja"
        self.chat_template: str | None = (template_file.read_text(encoding="utf-8")
                                          if template_file.is_file()
                                          else config.get("chat_template"))
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        # A bundle records the ids the PyTorch reference stopped on; use them when present.
        self.stop_ids = frozenset(stop_ids) if stop_ids else self._stop_ids(directory)

    def _stop_ids(self, directory: Path) -> frozenset[int]:
        ids = set(_as_list(_read_json(directory / "generation_config.json").get("eos_token_id")))
        ids.update(_as_list(_read_json(directory / "config.json").get("eos_token_id")))
        candidates = [self.special_tokens["eos_token"]]
        template = self.chat_template or ""
        candidates += [t for t in END_OF_TURN_TOKENS if t in template]
        for text in candidates:
            token_id = self.tokenizer.token_to_id(text) if text else None
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    def render_chat(self, prompt: str | list[dict[str, str]]) -> str:
        """A user prompt (or a list of {role, content} messages) plus the generation prompt,
        as transformers renders it."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass the prompt raw")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
            value, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        template = env.from_string(self.chat_template)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return template.render(messages=messages, add_generation_prompt=True,
                               **self.special_tokens)

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (multi-turn {role, content} messages) through the template."""
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, *, raw: bool = False) -> list[int]:
        """Token ids of a prompt, as the reference encodes it: the rendered template carries its
        own special tokens, and raw text (or a tokenizer without a template) gets none added."""
        if raw or not self.chat_template:
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return self.tokenizer.encode(self.render_chat(prompt), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenisation: text appears as soon as it is complete UTF-8.

    Decoding one token at a time breaks multi-byte characters and word-initial spaces, so the
    decoder re-decodes a short window (from the last emitted boundary) and emits only the new,
    complete suffix: O(window) per token, never O(text).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: context that fixes spacing of the next token
        self._read = 0  # tokens whose text has been emitted

    def push(self, ids: list[int]) -> str:
        """Add tokens, return the text they complete (may be empty)."""
        self._ids.extend(ids)
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character comes out as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted):]
