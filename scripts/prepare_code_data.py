#!/usr/bin/env python3
"""Prepare the code corpus for the default bitdlm model (runs on our machine, offline).

Corpus: every `.py` file of CPython's standard library as it ships with the
interpreter (including test/, excluding site-packages): PSF-licensed. A fixed
list of whole modules (HELDOUT_MODULES: the module and its test/test_<name>.py)
is held out for evaluation and never trained on -- not even by the tokenizer.
Dropped: files that are not UTF-8 (a few tests are deliberately latin-1), files
whose source does not parse (test data with deliberate syntax errors) and the
generated codec tables of encodings/ (mapping tables, not code).

Tokenizer: byte-level BPE (`tokenizers`) trained on the training split only.
The pre-tokenizer first isolates every newline + indentation run ("\\n" and the
spaces/tabs after it) so that "\\n    ", "\\n        ", ... become single cheap
tokens, then applies the GPT-2 byte-level split (which keeps inner runs of
spaces together). Specials: `<|endoftext|>` (id 0: BOS/EOS/pad, also the
document separator) and `<|mask|>` (id 1).

Output (default build-train/data/, git-ignored, carried to the GPU machine):
  train_tokens.npy / heldout_tokens.npy  uint16 token stream, each document
                                          preceded by <|endoftext|> and the
                                          stream ending with one
  train_docs.npy / heldout_docs.npy      int64: position of the <|endoftext|>
                                          that precedes each document
  tokenizer.json, meta.json              (meta: file lists, counts, held-out modules)

    python3 scripts/prepare_code_data.py --out build-train/data
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

EOT = "<|endoftext|>"
MASK = "<|mask|>"

STDLIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")

# Whole modules held out for evaluation (module file or package, plus its test
# file test/test_<name>.py or test package): small-to-mid pure-Python modules
# full of documented functions, so held-out function completions can be drawn.
HELDOUT_MODULES = """bisect calendar colorsys difflib filecmp fileinput fnmatch fractions getopt glob
graphlib heapq netrc pprint quopri reprlib sched shlex statistics textwrap""".split()

# Newline followed by its indentation: one pre-token (ByteLevel's GPT-2 split
# would otherwise cut "\n    def" into "\n   " + " def").
INDENT_RUN = r"\n[ \t]*"


def is_heldout(rel: Path) -> bool:
    parts = rel.parts
    stem = rel.stem if len(parts) == 1 else parts[0]
    if stem in HELDOUT_MODULES:
        return True
    if parts[0] == "test" and len(parts) >= 2:
        name = Path(parts[1]).stem
        return name.startswith("test_") and name[len("test_"):] in HELDOUT_MODULES
    return False


def collect_files(root: Path):
    """Sorted (relative path, text) of the usable .py files, and the drop counts."""
    files, dropped = [], {"not_utf8": 0, "no_parse": 0, "codec_table": 0}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("site-packages", "__pycache__"):
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            dropped["not_utf8"] += 1
            continue
        if rel.parts[0] == "encodings" and "Python Character Mapping Codec" in text[:400]:
            dropped["codec_table"] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(text)
        except (SyntaxError, ValueError):
            dropped["no_parse"] += 1
            continue
        text = text.replace("\r\n", "\n").strip("\n") + "\n"
        if text.strip():
            files.append((rel.as_posix(), text))
    return files, dropped


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(INDENT_RUN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode(tok, texts):
    """uint16 stream ([EOT] doc [EOT] doc ... [EOT]) and the EOT position before each doc."""
    import numpy as np

    eot = tok.token_to_id(EOT)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    lens = np.array([len(e.ids) for e in encs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]]).astype(np.int64)
    stream = np.full(int(lens.sum() + len(encs) + 1), eot, dtype=np.uint16)
    for s, e in zip(starts, encs):
        stream[s + 1 : s + 1 + len(e.ids)] = e.ids
    return stream, starts


def prepare(root: Path, out: Path, vocab_size: int, quiet: bool = False) -> dict:
    import numpy as np

    if vocab_size > 65536:
        raise SystemExit("vocab must fit uint16")
    t0 = time.time()
    files, dropped = collect_files(root)
    if not files:
        raise SystemExit(f"{root}: no usable .py files")
    train = [(n, t) for n, t in files if not is_heldout(Path(n))]
    held = [(n, t) for n, t in files if is_heldout(Path(n))]
    if not held or not train:
        raise SystemExit(f"{root}: empty split (train {len(train)}, held-out {len(held)})")
    tok = train_tokenizer([t for _, t in train], vocab_size)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(MASK) == 1
    out.mkdir(parents=True, exist_ok=True)
    meta = {"root": str(root), "heldout_modules": HELDOUT_MODULES, "dropped": dropped,
            "vocab_size": tok.get_vocab_size(), "eot_id": 0, "mask_id": 1}
    for split, docs in (("train", train), ("heldout", held)):
        stream, starts = encode(tok, [t for _, t in docs])
        np.save(out / f"{split}_tokens.npy", stream)
        np.save(out / f"{split}_docs.npy", starts)
        nbytes = sum(len(t.encode()) for _, t in docs)
        meta[split] = {"files": [n for n, _ in docs], "n_files": len(docs), "bytes": nbytes,
                       "tokens": int(stream.size), "bytes_per_token": nbytes / stream.size,
                       "sha256": hashlib.sha256(stream.tobytes()).hexdigest()}
    tok.save(str(out / "tokenizer.json"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if not quiet:
        for split in ("train", "heldout"):
            m = meta[split]
            print(f"{split}: {m['n_files']} files, {m['bytes'] / 1e6:.1f} MB, {m['tokens']} tokens "
                  f"({m['bytes_per_token']:.2f} bytes/token)")
        print(f"dropped {dropped}; vocab {meta['vocab_size']}; {time.time() - t0:.0f}s -> {out}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=STDLIB, help="the standard library folder")
    p.add_argument("--out", type=Path, default=Path("build-train/data"))
    p.add_argument("--vocab", type=int, default=8192)
    args = p.parse_args(argv)
    prepare(args.root, args.out, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
