#!/usr/bin/env python3
"""Re-store the token embedding and lm_head of a bitdlm `.bin` (f16 or int8,
docs/format.md "Token embedding and lm_head") without its source checkpoint:
every other tensor and the metadata are copied as they are.

    PYTHONPATH=python python3 scripts/restore_vocab.py IN.bin OUT.bin --embedding i8 --lm-head i8

The new tables are made from the rows IN holds (f16, or int8 x scale in fp32)
with the converter's rules (convert/tensors.py: f16 rounding, per-row absmax
int8), so an int8 table quantizes the f16 rows, not the original bf16/fp32 ones
`bitdlm convert --embedding i8` would start from. A table already int8 in IN is
copied, not quantized again. Prints the precision line of each new table (max
|delta| of its rows against IN's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from bitdlm.convert.tensors import ErrorMeter, f16_blocks, write_i8_table  # noqa: E402
from bitdlm.format import (ModelFile, ModelFormatError, ModelWriter, embedding_table,  # noqa: E402
                           expected_tensors, vocab_tensors)

ROWS = 8192


def _table(mf: ModelFile, which: str):
    """(weight name, scale name or None) of IN's embedding ("embedding") or lm_head rows."""
    if which == "embedding":
        return embedding_table(mf.meta)
    if mf.meta["quant"]["lm_head"] == "i8":
        return "lm_head.weight", "lm_head.scale"
    return ("lm_head.weight", None) if not mf.meta["tie_word_embeddings"] else embedding_table(mf.meta)


def _f32_blocks(mf: ModelFile, table):
    weight, scale = table
    w = mf.array(weight)
    s = mf.array(scale) if scale else None
    for i in range(0, w.shape[0], ROWS):
        b = w[i:i + ROWS].astype(np.float32)
        yield b * s[i:i + ROWS, None] if s is not None else b


def restore(src_path, out_path, lm_head: str, embedding: str, force: bool = False) -> dict:
    """Write OUT; returns {new table: ErrorMeter dict}."""
    precision = {}
    with ModelFile.open(src_path, verify=True) as mf:
        meta = json.loads(json.dumps(mf.meta))
        meta["quant"] = {**meta["quant"], "lm_head": lm_head, "embedding": embedding}
        specs = expected_tensors(meta)
        vocab = vocab_tensors(meta)
        with ModelWriter(out_path, meta, specs, overwrite=force) as w:
            for name, (dtype, _shape) in specs.items():
                if name not in vocab:
                    w.write(name, mf.array(name), scale=mf.tensors[name].scale)
                    continue
                if name.endswith(".scale"):
                    continue  # with its table
                # (tied, i8 embedding: the file's one table is lm_head.weight, made from IN's lm_head rows,
                # so the logits of an IN with an int8 lm_head do not move)
                src = _table(mf, "embedding" if name.startswith("model.embed_tokens.") else "lm_head")
                if dtype == mf.tensors[src[0]].dtype:  # already stored so: the same table
                    w.write(name, mf.array(src[0]))
                    if src[1] is not None:
                        w.write(name[:-len("weight")] + "scale", mf.array(src[1]))
                    continue
                meter = ErrorMeter(mf.tensors[src[0]].dtype, dtype)
                if dtype == "f16":
                    w.write(name, f16_blocks(_f32_blocks(mf, src), meter))
                else:
                    write_i8_table(w, name, _f32_blocks(mf, src), meter)
                precision[name] = meter.as_dict()
            w.commit()
    return precision


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="bitdlm .bin to read")
    ap.add_argument("out", help="bitdlm .bin to write")
    ap.add_argument("--lm-head", choices=("f16", "i8"), required=True)
    ap.add_argument("--embedding", choices=("f16", "i8"), required=True)
    ap.add_argument("--force", action="store_true", help="overwrite OUT")
    a = ap.parse_args(argv)
    try:
        precision = restore(a.src, a.out, a.lm_head, a.embedding, a.force)
    except (ModelFormatError, FileExistsError) as e:
        print(f"restore_vocab: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes; {a.src}: {os.path.getsize(a.src)} bytes)")
    for name, p in precision.items():
        print(f"  {name}: {p['source_dtype']} -> {p['stored']}: max |delta| {p['max_abs_error']:.3g} "
              f"(largest |w| {p['max_abs_value']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
