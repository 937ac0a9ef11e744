"""Tokenizer of a bitdlm model: the HF `tokenizers` tokenizer stored in the
`.bin` metadata, the model's chat template (jinja2, as transformers'
apply_chat_template renders it) and incremental detokenization."""
from __future__ import annotations

import json
import os
from datetime import datetime


class TokenizerMismatchError(ValueError):
    """A tokenizer folder that does not fit the model (vocabulary, special tokens)."""


def model_tokenizer(model_or_meta):
    """The tokenizer of a model: the one it already built (`Model.tokenizer`),
    else the one stored in its metadata, else None. The one place that
    fallback is written (the server, the offline API and generate use it)."""
    tok = getattr(model_or_meta, "_tokenizer", None)
    if tok is not None:
        return tok
    meta = model_or_meta if isinstance(model_or_meta, dict) else getattr(model_or_meta, "meta", {})
    if meta.get("tokenizer_json"):
        tok = Tokenizer.from_meta(meta)
        if not isinstance(model_or_meta, dict) and hasattr(model_or_meta, "_tokenizer"):
            model_or_meta._tokenizer = tok
        return tok
    return None


def _read_json_file(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerMismatchError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerMismatchError(f"{path} is not a JSON object")
    return data


def _token_text(v):
    """A special token as tokenizer_config / special_tokens_map write it: a
    string or an AddedToken dict {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


class Tokenizer:
    def __init__(self, tokenizer_json: str, chat_template: str | None = None,
                 bos_token_id: int | None = None, eos_token_ids=None):
        from tokenizers import Tokenizer as _HFTokenizer

        if not tokenizer_json:
            raise ValueError("the model has no tokenizer (tokenizer_json is empty)")
        try:
            self._tok = _HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed JSON
            from .format import ModelFormatError

            raise ModelFormatError(f"the model's tokenizer cannot be loaded: {str(e)[:200]}") from None
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [])
        self._template = None

    @classmethod
    def from_meta(cls, meta: dict) -> "Tokenizer":
        return cls(meta.get("tokenizer_json"), meta.get("chat_template"),
                   meta.get("bos_token_id"), meta.get("eos_token_ids"))

    @classmethod
    def from_dir(cls, path, meta: dict, embedded: "Tokenizer | None" = None) -> "Tokenizer":
        """A Hugging Face tokenizer folder (tokenizer.json, optionally
        tokenizer_config.json / special_tokens_map.json / chat_template.jinja)
        to use instead of the tokenizer stored in the model, after checking
        that it fits the model: its vocabulary is no larger than the model's,
        and the model's mask, BOS and EOS ids name the same tokens as in the
        embedded tokenizer (and as the folder's own special tokens say).
        The model's special-token ids are kept; the folder's chat template
        replaces the model's when it has one. Raises TokenizerMismatchError."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerMismatchError(f"tokenizer folder {path} does not exist or is not a folder")
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenizerMismatchError(f"{path} has no tokenizer.json (a Hugging Face fast "
                                         "tokenizer folder is needed)")
        try:
            with open(tj, encoding="utf-8") as f:
                text = f.read()
            tok = cls(text, meta.get("chat_template"), meta.get("bos_token_id"),
                      meta.get("eos_token_ids"))
        except TokenizerMismatchError:
            raise
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise TokenizerMismatchError(f"cannot load {tj}: {e}") from None
        cfg = _read_json_file(os.path.join(path, "tokenizer_config.json"))
        specials = _read_json_file(os.path.join(path, "special_tokens_map.json"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja = os.path.join(path, "chat_template.jinja")
        if not template and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, str) and template:
            tok.chat_template = template
        tok._check_fits(meta, embedded, {**specials, **cfg}, path)
        return tok

    def _check_fits(self, meta, embedded, named, where) -> None:
        vocab = int(meta["vocab_size"])
        if self.vocab_size > vocab:
            raise TokenizerMismatchError(
                f"the tokenizer in {where} has {self.vocab_size} tokens, more than the model's "
                f"vocabulary of {vocab}")
        ids = {"mask": [meta.get("mask_token_id")], "bos": [meta.get("bos_token_id")],
               "eos": list(meta.get("eos_token_ids") or [])}
        for role, role_ids in ids.items():
            for i in role_ids:
                if i is None:
                    continue
                mine = self.id_to_token(i)
                if mine is None:
                    raise TokenizerMismatchError(
                        f"the model's {role} token id {i} is not in the tokenizer in {where}")
                if embedded is not None:
                    theirs = embedded.id_to_token(i)
                    if theirs is not None and theirs != mine:
                        raise TokenizerMismatchError(
                            f"the model's {role} token id {i} is {theirs!r} in the model's "
                            f"tokenizer but {mine!r} in {where}")
            text = _token_text(named.get(f"{role}_token"))
            if text is None or not any(i is not None for i in role_ids):
                continue
            tid = self.token_to_id(text)
            if tid not in role_ids:
                raise TokenizerMismatchError(
                    f"{where} names {text!r} (id {tid}) as its {role} token, but the model's "
                    f"{role} token id is {role_ids[0] if len(role_ids) == 1 else role_ids}")

    # -------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # Past this many characters encode goes through encode_batch, which releases
    # the GIL while it works (encode holds it: a 2.7 MB text stalled every other
    # Python thread for 18 s on 2 busy cores).
    _NOGIL_CHARS = 8192

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self._NOGIL_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: a text longer than
        n * this cannot encode into n tokens or fewer (a cheap size bound)."""
        if getattr(self, "_max_token_chars", None) is None:
            self._max_token_chars = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)),
                                        default=1)
        return self._max_token_chars

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
        return self.add_many((token_id,))

    def add_many(self, token_ids) -> str:
        """The text delta of several new tokens at once: two decodes for the lot, not per token."""
        self.ids.extend(int(t) for t in token_ids)
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
