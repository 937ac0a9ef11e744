"""Fuzzing the loader and the converter's inputs: every mutated model file either
opens (and then loads in C++ and runs a forward) or raises ModelFormatError;
every mutated config.json either converts or raises ConversionError. Nothing
else, no crash.

Seeded and sized for CI (a few seconds); a longer run on demand:

    BITDLM_FUZZ_ITERS=100000 BITDLM_FUZZ_SEED=7 pytest tests/test_fuzz.py

(BITDLM_FUZZ_ITERS is the number of header mutations; truncations and
converter cases scale with it.) Files that open are handed to one child process
that loads them with bitdlm.load (the C++ Model) and runs a forward, so a crash
there fails the test naming the file instead of killing pytest.
"""
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from bitdlm.format import PREAMBLE_SIZE, ModelFile, ModelFormatError, describe
from hf_models import child_env
from format_models import write_model

ITERS = int(os.environ.get("BITDLM_FUZZ_ITERS", "1500"))
SEED = int(os.environ.get("BITDLM_FUZZ_SEED", "0"))

# values that break parsers: limits, wrong types, non-finite, huge
INTERESTING = [0, -1, 1, 2, 3, 7, 63, 64, 65, 255, 2**15, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64 + 1,
               -2**63, 10**400, 0.5, -0.0, 1e-320, 1e39, 1e308, float("inf"), float("-inf"), float("nan"),
               "", "x", "f16", "i2_b128", "i8", "f32", "bitnet", "relu2", None, True, False, [], {}, [0],
               [2**40, 2**40], [64, 64], [-1, 64], {"a": [[[]]]}, "\u00e9\u0000", "\ud800"]


def _split(data: bytes):
    magic, ver, _crc, hlen = struct.unpack_from("<8sIIQ", data, 0)
    return data[:8], ver, hlen, data[PREAMBLE_SIZE:PREAMBLE_SIZE + hlen], data[PREAMBLE_SIZE + hlen:]


def _with_header(data: bytes, raw: bytes):
    """`data` with header bytes `raw` (padded to the reserved length) and a valid crc; None if too long."""
    magic, ver, hlen, _old, rest = _split(data)
    if len(raw) > hlen:
        return None
    raw = raw + b" " * (hlen - len(raw))
    return struct.pack("<8sIIQ", magic, ver, zlib.crc32(raw), hlen) + raw + rest


def _paths(obj, prefix=()):
    """Every path into the JSON (dict keys / list indexes), the tokenizer string excluded."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "tokenizer_json":
                yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate_structure(header: dict, rng: random.Random) -> dict:
    h = json.loads(json.dumps(header))
    paths = [p for p in _paths(h) if p]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        path = rng.choice(paths)
        parent = h
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            op = rng.random()
            if op < 0.12 and isinstance(parent, dict):
                del parent[key]
            elif op < 0.2 and isinstance(parent, list):
                parent.append(json.loads(json.dumps(parent[key])))  # a duplicate entry
            elif op < 0.35 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
                parent[key] += rng.choice((-64, -1, 1, 64, 4096))  # off by a little
            else:
                parent[key] = rng.choice(INTERESTING)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return h


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        i = rng.randrange(len(b))
        b[i] = rng.choice((b[i] ^ (1 << rng.randrange(8)), rng.randrange(256), ord(rng.choice('{}[]",:0123456789-e.'))))
    return bytes(b)


def _cases(data: bytes, rng: random.Random, n: int):
    """(label, blob) of mutated files: header fields and bytes with a valid crc, preamble fields, truncations."""
    header = json.loads(_split(data)[3])
    raw = _split(data)[3].rstrip(b" ")
    for i in range(n):
        r = rng.random()
        if r < 0.55:
            blob = _with_header(data, json.dumps(_mutate_structure(header, rng)).encode())
            label = "structure"
        elif r < 0.8:
            blob = _with_header(data, _mutate_bytes(raw, rng))
            label = "bytes"
        elif r < 0.9:
            cut = rng.choice((rng.randrange(len(data)), rng.randrange(PREAMBLE_SIZE + len(raw) + 64)))
            blob, label = data[:cut], f"truncated@{cut}"
        else:
            b = bytearray(data)
            field = rng.choice(((8, "<I"), (12, "<I"), (16, "<Q")))
            struct.pack_into(field[1], b, field[0], rng.choice(
                (0, 1, 2, rng.randrange(1 << 32), len(raw), len(raw) + 1, len(data), (1 << 64) - 1))
                if field[1] == "<Q" else rng.randrange(1 << 32))
            blob, label = bytes(b), "preamble"
        if blob is not None:
            yield f"{i}:{label}", blob


_CHILD = r"""
import json, sys
import bitdlm
from bitdlm.format import ModelFile, ModelFormatError
for path in json.load(open(sys.argv[1])):
    print("BEGIN", path, flush=True)
    try:
        ModelFile.open(path, verify=True).close()   # crc32 of every tensor + the tokenizer
        m = bitdlm.load(path, threads=1)
        m.logits([0, 1, 2])
        m.close()
        print("OK", path, flush=True)
    except ModelFormatError:
        print("MFE", path, flush=True)
    except Exception as e:
        print("EXC", path, type(e).__name__, str(e)[:300].replace("\n", " "), flush=True)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_fuzz_model_headers(tmp_path):
    rng = random.Random(SEED)
    base = tmp_path / "base.bin"
    write_model(base)
    data = base.read_bytes()
    survivors, outcomes = [], {"ok": 0, "error": 0}
    for label, blob in _cases(data, rng, ITERS):
        p = tmp_path / "case.bin"
        p.write_bytes(blob)
        try:
            with ModelFile.open(p) as mf:
                describe(mf)  # `bitdlm info` of whatever opened
        except ModelFormatError:
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the point of the test
            keep = tmp_path / "failing.bin"
            p.rename(keep)
            pytest.fail(f"case {label} (seed {SEED}): {type(e).__name__}: {e} (file kept: {keep})")
        outcomes["ok"] += 1
        if blob != data and len(survivors) < 400:
            keep = tmp_path / f"open-{len(survivors)}.bin"
            p.rename(keep)
            survivors.append(str(keep))
    # the mutations reach both outcomes (a fuzzer that only makes garbage tests nothing)
    print("headers:", outcomes, "survivors loaded in C++:", len(survivors))
    assert outcomes["error"] > ITERS // 4 and outcomes["ok"] > ITERS // 50, outcomes
    # what opened goes through the C++ loader and a forward, in a child that may crash
    lst = tmp_path / "survivors.json"
    lst.write_text(json.dumps(survivors + [str(base)]))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(lst)], capture_output=True, text=True,
                       env=child_env(OMP_NUM_THREADS=1), timeout=600)
    lines = r.stdout.splitlines()
    begun = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("BEGIN ")]
    assert r.returncode == 0 and lines and lines[-1] == "DONE", (
        f"child died (rc {r.returncode}) on {begun[-1] if begun else '?'}: {r.stderr[-2000:]}")
    bad = [ln for ln in lines if ln.startswith("EXC ")]
    assert not bad, f"{len(bad)} files opened but failed to load with another exception: {bad[:5]}"
    assert f"OK {base}" in lines  # the unmutated file loads and runs


# ----------------------------------------------------------------------------- converter

def _cfg_mutations(cfg: dict, rng: random.Random):
    c = json.loads(json.dumps(cfg))
    keys = list(c) + ["mask_token_id", "bd_size", "small_block_size", "threshold", "shift_logits", "head_dim",
                      "quantization_config", "rope_parameters", "rope_scaling", "architectures"]
    for _ in range(rng.choice((1, 1, 2, 3))):
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.15:
            c.pop(k, None)
        elif r < 0.3 and isinstance(c.get(k), int) and not isinstance(c.get(k), bool):
            c[k] = c[k] * rng.choice((0, 2, -1)) + rng.choice((0, 1))
        elif r < 0.4 and k == "quantization_config":
            c[k] = {"quant_method": rng.choice(("bitnet", "gptq", 1)),
                    "linear_class": rng.choice(("bitlinear", "autobitlinear", "x", None, 3))}
        elif r < 0.45 and k == "rope_parameters":
            c[k] = {"rope_type": rng.choice(("default", "yarn", None, 1)), "rope_theta": rng.choice(INTERESTING)}
        else:
            c[k] = rng.choice(INTERESTING)
    text = json.dumps(c)
    if rng.random() < 0.2:  # and byte-level damage
        b = bytearray(text.encode())
        for _ in range(rng.choice((1, 3))):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    return text.encode()


def test_fuzz_converter_configs(tmp_path):
    from np_models import numpy_checkpoint
    from bitdlm.convert import ConversionError, convert_report

    rng = random.Random(SEED + 1)
    hf = numpy_checkpoint(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    gen = (hf / "generation_config.json").read_text()
    tok_cfg = (hf / "tokenizer_config.json").read_text()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    n = max(40, ITERS // 10)
    outcomes = {"ok": 0, "error": 0}
    for i in range(n):
        (hf / "config.json").write_bytes(_cfg_mutations(cfg, rng))
        if rng.random() < 0.2:  # the generation config's token ids too
            g = json.loads(gen)
            g[rng.choice(("eos_token_id", "bos_token_id", "pad_token_id"))] = rng.choice(INTERESTING)
            (hf / "generation_config.json").write_text(json.dumps(g))
        else:
            (hf / "generation_config.json").write_text(gen)
        if rng.random() < 0.2:  # and the tokenizer config's special tokens / chat template
            t = json.loads(tok_cfg)
            t[rng.choice(("bos_token", "eos_token", "pad_token", "mask_token", "chat_template"))] = rng.choice(
                INTERESTING + [{"content": "<|mask|>"}, {"content": 5}, [{"name": "default", "template": 1}]])
            (hf / "tokenizer_config.json").write_text(json.dumps(t))
        else:
            (hf / "tokenizer_config.json").write_text(tok_cfg)
        out = out_dir / "m.bin"
        try:
            convert_report(hf, out, progress=False, force=True)
        except ConversionError:
            outcomes["error"] += 1
            leftovers = [p.name for p in out_dir.iterdir() if p.name != "m.bin"]
            assert not leftovers, leftovers
            continue
        except Exception as e:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"case {i} (seed {SEED}): {type(e).__name__}: {e}\nconfig.json: "
                        f"{(hf / 'config.json').read_bytes()[:2000]!r}")
        outcomes["ok"] += 1
        ModelFile.open(out, verify=True).close()  # whatever converts is a valid file
    print("configs:", outcomes)
    assert outcomes["error"] > n // 4 and outcomes["ok"] > 0, outcomes


def test_fuzz_converter_safetensors_header(tmp_path):
    """Mutated safetensors headers (entries' dtype / shape / data_offsets, bytes): converted or
    ConversionError, never another exception."""
    from np_models import numpy_checkpoint
    from bitdlm.convert import ConversionError, convert_report

    rng = random.Random(SEED + 2)
    hf = numpy_checkpoint(tmp_path / "hf")
    st = hf / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = max(30, ITERS // 50)
    outcomes = {"ok": 0, "error": 0}
    for i in range(cases):
        h = json.loads(json.dumps(header))
        if rng.random() < 0.15:  # benign: safetensors readers ignore __metadata__
            h["__metadata__"] = rng.choice(INTERESTING)
        for _ in range(rng.choice((0, 1, 1, 2))):
            e = h[rng.choice(names)]
            field = rng.choice(("dtype", "shape", "data_offsets", "entry"))
            if field == "entry":
                h[rng.choice(names)] = rng.choice(INTERESTING)
            elif field == "data_offsets" and rng.random() < 0.5 and isinstance(e, dict):
                e["data_offsets"] = [e["data_offsets"][0] + rng.choice((-8, 8, 2**40)), e["data_offsets"][1]]
            elif isinstance(e, dict):
                e[field] = rng.choice(INTERESTING + ["BF16", "U8", "F64", "I32", [1, 2, 3]])
        raw = json.dumps(h).encode()
        if rng.random() < 0.25:
            b = bytearray(raw)
            for _ in range(rng.choice((1, 4))):
                b[rng.randrange(len(b))] = rng.randrange(256)
            raw = bytes(b)
        cut = len(body) if rng.random() < 0.85 else rng.randrange(len(body))
        st.write_bytes(struct.pack("<Q", len(raw)) + raw + body[:cut])
        try:
            convert_report(hf, out_dir / "m.bin", progress=False, force=True)
        except ConversionError:
            outcomes["error"] += 1
            assert [p.name for p in out_dir.iterdir() if p.name != "m.bin"] == []
            continue
        except Exception as e:  # noqa: BLE001 -- the point of the test
            pytest.fail(f"case {i} (seed {SEED}): {type(e).__name__}: {e}\nheader: {raw[:1500]!r}")
        outcomes["ok"] += 1
    print("safetensors headers:", outcomes)
    assert outcomes["error"] > cases // 2, outcomes
