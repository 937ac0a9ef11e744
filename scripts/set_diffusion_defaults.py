#!/usr/bin/env python3
"""Change the diffusion defaults (meta["diffusion"]: threshold, block_size,
small_block_size) stored in a converted bitdlm .bin, when the Hugging Face
checkpoint that `bitdlm convert --threshold ...` would need is not at hand.

The file is rewritten through bitdlm.format's own reader and writer (not
patched in place): every tensor is copied byte for byte with its scale, the
new meta is validated like any converted file, the header checksum and every
tensor's crc32 are recomputed, and the output appears atomically (a failure
leaves the original untouched). The change is recorded in meta["source"].

    python3 scripts/set_diffusion_defaults.py python/bitdlm/data/tiny-bitdlm.bin --threshold 0.7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
from bitdlm.format import ModelFile, ModelFormatError, ModelWriter, expected_tensors  # noqa: E402


def set_defaults(path, out=None, **changes) -> Path:
    out = Path(out or path)
    changes = {k: v for k, v in changes.items() if v is not None}
    with ModelFile.open(path, verify=True) as mf:
        meta = dict(mf.meta)
        diff = dict(meta["diffusion"])
        before = dict(diff)
        diff.update(changes)
        meta["diffusion"] = diff
        src = dict(meta.get("source") or {})
        src.setdefault("edits", []).append({"tool": "scripts/set_diffusion_defaults.py",
                                            "diffusion_before": before, "diffusion_after": diff})
        meta["source"] = src
        specs = expected_tensors(meta)
        with ModelWriter(out, meta, specs, overwrite=True) as w:  # validates meta
            for name in specs:
                t = mf.tensors[name]
                w.write(name, mf.array(name), scale=t.scale if t.dtype == "i2_b128" else None)
            w.commit()
    with ModelFile.open(out, verify=True) as check:
        assert check.meta["diffusion"] == diff
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--out", default=None, help="default: rewrite the model file itself")
    p.add_argument("--threshold", type=float)
    p.add_argument("--block-size", type=int)
    p.add_argument("--small-block-size", type=int)
    a = p.parse_args(argv)
    try:
        out = set_defaults(a.model, a.out, threshold=a.threshold, block_size=a.block_size,
                           small_block_size=a.small_block_size)
    except (ModelFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ModelFile.open(out) as mf:
        print(f"{out}: diffusion {mf.meta['diffusion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
