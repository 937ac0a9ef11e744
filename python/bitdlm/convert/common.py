"""What every importer of `bitdlm convert` shares: the error type, reading a
JSON config file, and turning SIGTERM / SIGHUP into an unwinding exception so
the writer's temporary file never outlives a killed conversion."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

from ..format import short_repr


class ConversionError(ValueError):
    """The input checkpoint cannot be converted (clear message for the user)."""



def read_json(path: Path, required: bool) -> dict:
    """A JSON object file (an empty dict when optional and absent)."""
    if not path.is_file():
        if required:
            raise ConversionError(f"{path.parent}: missing {path.name}")
        return {}
    if path.stat().st_size > 64 << 20:
        raise ConversionError(f"{path}: {path.stat().st_size} bytes is too large for a config file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, huge ints, deep nesting
        raise ConversionError(f"{path}: invalid JSON ({short_repr(str(e), 200)})") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    return d


class Terminated(SystemExit):
    """SIGTERM / SIGHUP during a conversion: unwinds like an exception, so the
    writer's cleanup runs and no temporary file is left (exit status 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def signals_unwind():
    """Turn SIGTERM / SIGHUP into Terminated for the block (SIGINT already raises
    KeyboardInterrupt). Only on the main thread, and only where nobody installed
    a handler of their own."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, _frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def check_output(out_path: Path, force: bool, hf_dir: Path | None = None) -> None:
    """The output path can take a new file (before any work is done): never a
    directory, a device / FIFO / socket (even with --force: `--force` onto
    /dev/full replaced the device node with a file), or a file of the input
    checkpoint (`bitdlm convert hf hf/model.safetensors --force` destroyed it)."""
    if out_path.is_dir():
        raise ConversionError(f"output {out_path} is a directory")
    if out_path.exists():
        if not force:
            raise ConversionError(f"output {out_path} already exists (use --force to overwrite)")
        if not out_path.is_file():
            raise ConversionError(f"output {out_path} exists and is not a regular file (a device, "
                                  "FIFO or socket): refusing to replace it, even with --force")
        if hf_dir is not None and hf_dir.is_file():  # an SGLBITNT / GGUF input
            if os.path.samefile(hf_dir, out_path):
                raise ConversionError(f"output {out_path} is the file being converted: refusing to "
                                      "overwrite the input")
        elif hf_dir is not None and hf_dir.is_dir():
            for f in hf_dir.iterdir():
                try:
                    same = f.is_file() and os.path.samefile(f, out_path)
                except OSError:
                    same = False
                if same:
                    raise ConversionError(f"output {out_path} is {f.name} of the checkpoint being "
                                          "converted: refusing to overwrite the input")
    if not out_path.parent.is_dir():
        raise ConversionError(f"output directory {out_path.parent} does not exist")


def token_report(chosen: dict, tokenizer, vocab_size: int, guessed: list) -> dict:
    """The summary's `tokens`: id, text and source of the mask / bos / pad / eos
    tokens chosen; an id without text in the tokenizer is noted in `guessed`."""
    ntok = tokenizer.get_vocab_size(with_added_tokens=True)
    tok_of = lambda i: None if i is None else tokenizer.id_to_token(i)  # noqa: E731
    tokens = {k[:-len("_token_id")]: {"id": chosen[k][0], "token": tok_of(chosen[k][0]), "source": chosen[k][1]}
              for k in ("mask_token_id", "bos_token_id", "pad_token_id")}
    tokens["eos"] = [{"id": i, "token": tok_of(i), "source": src} for i, src in chosen["eos_token_ids"]]
    for k, t in list(tokens.items()):
        for e in (t if isinstance(t, list) else [t]):
            if e["id"] is not None and e["token"] is None:
                guessed.append(f"{k} id {e['id']} has no text in the tokenizer ({ntok} tokens, "
                               f"vocab_size {vocab_size})")
    if chosen["mask_token_id"][0] is None:
        guessed.append("no mask token: diffusion decoding needs one (re-convert with --mask-token)")
    return tokens
