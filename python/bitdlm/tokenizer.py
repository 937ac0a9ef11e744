"""Tokenizer of a bitdlm model: the HF `tokenizers` tokenizer stored in the
`.bin` metadata, the model's chat template (jinja2, as transformers'
apply_chat_template renders it) and incremental detokenization."""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime

# Bounds of one chat-template render. A template comes with the model and is
# code: one that loops (range(10^5) inside range(10^5)) froze the server on a
# single chat request. Past these the render stops with ChatTemplateLimitError
# (the server answers 400). docs/server.md "Limits".
RENDER_SECONDS = 2.0
RENDER_CHARS = 1 << 25  # output, and any one string / list the template builds


class ChatTemplateLimitError(ValueError):
    """A chat template that ran past RENDER_SECONDS or built more than RENDER_CHARS."""


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
        self._bytes = False  # the detokenizer's byte table (build_byte_table), built at first use

    def _byte_table(self) -> list | None:
        if self._bytes is False:
            self._bytes = build_byte_table(self._tok)
        return self._bytes

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
        text = _render_bounded(compiled, dict(messages=list(messages),
                                              add_generation_prompt=add_generation_prompt, **ctx))
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @staticmethod
    def _compile(template: str):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = _bounded_env_class()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(template)

    # ----------------------------------------------- incremental decoding
    def detokenizer(self, prompt_ids=None, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def _too_big(x) -> bool:
    return isinstance(x, (str, list, tuple, dict)) and len(x) > RENDER_CHARS


def _render_bounded(compiled, ctx: dict) -> str:
    """compiled.render(**ctx) within RENDER_SECONDS and RENDER_CHARS. A trace
    function (on this thread only, while the template renders) checks the
    clock at every call and every template line, so any loop stops at the
    deadline; the output is counted as it is produced; _BoundedEnvironment
    bounds what one C-level operation may build."""
    deadline = time.monotonic() + RENDER_SECONDS

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise ChatTemplateLimitError(f"the chat template ran longer than {RENDER_SECONDS:g} s")
        return local

    def on_call(frame, event, arg):
        local(frame, event, arg)
        return local if frame.f_code.co_filename == "<template>" else None

    old = sys.gettrace()
    sys.settrace(on_call)
    try:
        out, n = [], 0
        for piece in compiled.generate(**ctx):
            n += len(piece)
            if n > RENDER_CHARS:
                raise ChatTemplateLimitError(f"the chat template rendered more than {RENDER_CHARS} "
                                             "characters")
            out.append(piece)
    finally:
        sys.settrace(old)
    return "".join(out)


def _check_size(what, x):
    if _too_big(x):
        raise ChatTemplateLimitError(f"the chat template built a value over {RENDER_CHARS} "
                                     f"items ({what})")
    return x


def _check_call(name, fn, args, kwargs):
    """Refuse calls that would build a huge value in one C call: a width or
    count argument past RENDER_CHARS (center, ljust, indent, zfill, ...), a
    replace() whose result would be too long; then check the result's size."""
    if any(isinstance(a, int) and abs(a) > RENDER_CHARS for a in (*args, *kwargs.values())):
        raise ChatTemplateLimitError(f"the chat template passes a too large number to {name}")
    if name in ("format", "%") and args and isinstance(args[0], str):
        _no_huge_width(args[0])
    if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        s, old, new = args[:3]
        if len(s) + (s.count(old) if old else len(s) + 1) * (len(new) - len(old)) > RENDER_CHARS:
            raise ChatTemplateLimitError("the chat template builds a too long string (replace)")
    return _check_size(name, fn(*args, **kwargs))


def _bounded_env_class():
    import functools

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox with size checks on what one operation builds in C,
        out of reach of _render_bounded's clock (`"x" * 10**10`, `10 ** 10 ** 9`,
        `s ~ s` doubling, `s|replace("", s)` squaring, `"{:>9999999999}".format`):
        binary operators, calls, filters and `~`."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.filters = {k: self._bounded_filter(k, f) for k, f in self.filters.items()}

        def _bounded_filter(self, name, fn):
            wrapped = functools.partial(self._filter, name, fn)
            if getattr(fn, "jinja_pass_arg", None) is not None:
                wrapped.jinja_pass_arg = fn.jinja_pass_arg  # jinja reads it off the filter
            return wrapped

        @staticmethod
        def _filter(name, fn, *args, **kwargs):
            # a filter marked pass_context / pass_eval_context / pass_environment gets that first
            skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
            return _check_call(name, lambda *a, **k: fn(*args[:skip], *a, **k), args[skip:], kwargs)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and abs(left) > 1 and right * abs(left).bit_length() > 8 * RENDER_CHARS:
                raise ChatTemplateLimitError("the chat template computes a too large power")
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(k, int) \
                            and len(seq) * k > RENDER_CHARS:
                        raise ChatTemplateLimitError("the chat template builds a too long sequence")
            if operator == "%" and isinstance(left, str):
                _no_huge_width(left)
            return _check_size(operator, super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value):
            if getattr(value, "__name__", None) in ("format", "format_map") \
                    and isinstance(getattr(value, "__self__", None), str):
                _no_huge_width(value.__self__)
            return super().wrap_str_format(value)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            name = getattr(__obj, "__name__", "a call")
            base = super(BoundedEnvironment, __self).call
            if isinstance(getattr(__obj, "__self__", None), str):  # checked as the filter of that name
                return _check_call(name, lambda *a, **k: base(__context, __obj, *a[1:], **k),
                                   (__obj.__self__, *args), kwargs)
            return _check_call(name, lambda *a, **k: base(__context, __obj, *a, **k), args, kwargs)

        def from_string(self, source, *args, **kwargs):
            tpl = super().from_string(source, *args, **kwargs)
            # `~` compiles to the runtime's str_join / markup_join, looked up in
            # the template module's globals: bound them there
            g = tpl.root_render_func.__globals__
            for join in ("str_join", "markup_join"):
                if join in g:
                    g[join] = functools.partial(_bounded_join, g[join])
            return tpl

    return BoundedEnvironment


def _bounded_join(join, seq):
    seq = list(seq)
    if sum(len(x) for x in seq if isinstance(x, str)) > RENDER_CHARS:
        raise ChatTemplateLimitError("the chat template builds a too long string (~)")
    return join(seq)


def _no_huge_width(fmt: str) -> None:
    """A printf / str.format spec with a width or precision past RENDER_CHARS."""
    import re

    if any(int(d) > RENDER_CHARS for d in re.findall(r"\d{8,}", fmt)):
        raise ChatTemplateLimitError("the chat template formats with a too large width")


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas. A delta is only released
    once it no longer ends in an incomplete UTF-8 sequence (decoded as U+FFFD),
    and decoding always restarts a few tokens back so word-boundary rules
    (leading spaces, byte fallback) see their left context.

    The definition (`_add_generic`): the text of ids[prefix:] less that of
    ids[prefix:read], two `decode` calls per step. The fast path gives the same
    deltas with one `bytes.decode` of the new tokens' bytes, for byte-level
    tokenizers (`_byte_table`): there the text of ordinary tokens is their
    concatenated bytes decoded with U+FFFD for invalid sequences, and when the
    text of ids[prefix:read] does not end in U+FFFD (its bytes end in a complete
    character: the decoder starts afresh after it) the text of ids[prefix:] is
    that text followed by the decoded bytes of ids[read:]. Released text never
    ends in U+FFFD, so this holds after every release of ordinary tokens.
    `_pend` (the bytes of ids[read:]) is None while it does not hold, and the
    definition runs (special / added tokens, ids the table lacks, a prompt
    context ending mid-character) until a release restores it."""

    _CONTEXT = 5  # prompt tokens used as left context

    def __init__(self, tok: Tokenizer, prompt_ids=None, skip_special_tokens: bool = True):
        self.tok = tok
        self.skip = skip_special_tokens
        ctx = list(prompt_ids or [])[-self._CONTEXT:]
        self.ids = ctx
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (the left context)
        self.read = len(ctx)
        self._tbl = tok._byte_table()  # id -> bytes (None: not an ordinary token), or None: no fast path
        self._pend = self._valid_window()

    def _valid_window(self) -> bytes | None:
        """b"" (the fast path, nothing pending) when ids[read:] is empty and ids[prefix:read]
        are ordinary tokens whose bytes end in a complete character, else None."""
        tbl = self._tbl
        if tbl is None or self.read != len(self.ids):
            return None
        try:
            text = b"".join([tbl[t] for t in self.ids[self.prefix:self.read]]).decode("utf-8", "replace")
        except (TypeError, IndexError):
            return None
        return None if text.endswith("\ufffd") else b""

    def _decode(self, a: int, b: int | None = None) -> str:
        # straight to `tokenizers` (the slice is a fresh list already)
        return self.tok._tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """The text delta of one new token."""
        t = int(token_id)
        ids = self.ids
        ids.append(t)
        pend = self._pend
        if pend is None:
            return self._add_generic()
        try:  # (ids are >= 0: the engine checks prompts and produces no negative ids)
            pend += self._tbl[t]
        except (TypeError, IndexError):  # not an ordinary token: the definition takes over
            self._pend = None
            return self._add_generic()
        return self._take(pend)

    def add_many(self, token_ids) -> str:
        """The text delta of several new tokens at once."""
        if type(token_ids) is not list:  # (the engine's are lists of ints already)
            token_ids = [int(t) for t in token_ids]
        if len(token_ids) == 1:  # (AR's every step)
            return self.add(token_ids[0])
        self.ids += token_ids
        pend = self._pend
        if pend is None:
            return self._add_generic()
        tbl = self._tbl
        try:
            pend += b"".join([tbl[t] for t in token_ids])
        except (TypeError, IndexError):
            self._pend = None
            return self._add_generic()
        return self._take(pend)

    def _take(self, pend: bytes) -> str:
        """The fast path's step: `pend` (the bytes of ids[read:]) decoded, released unless it
        ends in U+FFFD."""
        text = pend.decode("utf-8", "replace")
        if text and text[-1] != "\ufffd":
            self.prefix, self.read = self.read, len(self.ids)
            self._pend = b""  # (the released bytes end in a complete character)
            return text
        self._pend = pend
        return ""

    def _add_generic(self) -> str:
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self._pend = self._valid_window()
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (end of generation)."""
        pend = self._pend
        if pend is not None:
            out = pend.decode("utf-8", "replace")
        else:
            before = self._decode(self.prefix, self.read)
            now = self._decode(self.prefix)
            out = now[len(before):] if len(now) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        self._pend = None if self._tbl is None else b""  # (nothing left of the window)
        return out


# GPT-2's byte-level alphabet: byte -> the printable character that stands for it in the vocabulary
def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_byte_table(hf, checks: int = 256) -> list | None:
    """For a `tokenizers` tokenizer whose decoder is ByteLevel alone: per id, the bytes of
    its ordinary (non-added) token, None for added tokens; None when the decoder is another
    or the table fails its checks. Checked against `decode` itself: every token (in runs of
    64 consecutive ids) and `checks` random runs of tokens (multi-byte pieces split across
    tokens among them). ~10 ms for 8k tokens (2 cores); it grows with the vocabulary."""
    import random

    from tokenizers import decoders

    if type(hf.decoder) is not decoders.ByteLevel:
        return None
    # each character of the byte-level alphabet -> its byte; latin-1 characters outside the
    # alphabet -> one that latin-1 cannot encode (ByteLevel decodes a token holding a
    # character outside its alphabet as the token's UTF-8)
    to_byte = dict.fromkeys(range(256), 0xFFFF)
    to_byte.update({ord(c): b for b, c in _bytes_to_unicode().items()})
    added = set(hf.get_added_tokens_decoder())
    vocab = hf.get_vocab(with_added_tokens=False)
    if not vocab:
        return None
    tbl = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        if i in added:
            continue
        try:
            tbl[i] = t.translate(to_byte).encode("latin-1")
        except UnicodeEncodeError:
            tbl[i] = t.encode("utf-8")
    plain = [i for i, b in enumerate(tbl) if b is not None]
    rng = random.Random(0)
    multi = [i for i in plain if not tbl[i].isascii()] or plain
    runs = [plain[k:k + 64] for k in range(0, len(plain), 64)]
    runs += [[rng.choice(multi if rng.random() < 0.5 else plain) for _ in range(rng.randint(1, 8))]
             for _ in range(checks)]
    got = hf.decode_batch(runs, skip_special_tokens=False)
    if any(g != b"".join([tbl[i] for i in r]).decode("utf-8", "replace") for r, g in zip(runs, got)):
        return None
    return tbl
