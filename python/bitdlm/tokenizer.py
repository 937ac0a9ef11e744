"""Tokenizer of a bitdlm model: the HF `tokenizers` tokenizer stored in the
`.bin` metadata, the model's chat template (jinja2, as transformers'
apply_chat_template renders it) and incremental detokenization."""
from __future__ import annotations

import json
from datetime import datetime


class Tokenizer:
    def __init__(self, tokenizer_json: str, chat_template: str | None = None,
                 bos_token_id: int | None = None, eos_token_ids=None):
        from tokenizers import Tokenizer as _HFTokenizer

        if not tokenizer_json:
            raise ValueError("the model has no tokenizer (tokenizer_json is empty)")
        self._tok = _HFTokenizer.from_str(tokenizer_json)
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [])
        self._template = None

    @classmethod
    def from_meta(cls, meta: dict) -> "Tokenizer":
        return cls(meta.get("tokenizer_json"), meta.get("chat_template"),
                   meta.get("bos_token_id"), meta.get("eos_token_ids"))

    # -------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(int(i))

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    # -------------------------------------------------------- chat template
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs):
        """Render `messages` like transformers' apply_chat_template. With
        tokenize=True returns token ids (the template carries the special tokens)."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this model has no chat template")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        compiled = self._compile(template) if chat_template else (self._template or self._compile(template))
        if not chat_template:
            self._template = compiled
        ctx = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        ctx.update(kwargs)
        text = compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **ctx)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @staticmethod
    def _compile(template: str):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(template)

    # ----------------------------------------------- incremental decoding
    def detokenizer(self, prompt_ids=None, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas. A delta is only released
    once it no longer ends in an incomplete UTF-8 sequence (decoded as U+FFFD),
    and decoding always restarts a few tokens back so word-boundary rules
    (leading spaces, byte fallback) see their left context."""

    _CONTEXT = 5  # prompt tokens used as left context

    def __init__(self, tok: Tokenizer, prompt_ids=None, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        ctx = list(prompt_ids or [])[-self._CONTEXT:]
        self.ids = ctx
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (the left context)
        self.read = len(ctx)

    def _decode(self, a: int, b: int | None = None) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (end of generation)."""
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""
