"""`.bin` writer / reader tests (no torch): round trip, zero-copy views, and a
table of damaged or foreign files that must each raise ModelFormatError."""
import argparse
import json
import struct
import zlib

import numpy as np
import pytest

from bitdlm import packing
from bitdlm.format import (ALIGN, PREAMBLE_SIZE, VERSION, ModelFile, ModelFormatError,
                           ModelWriter, describe, embedding_table, expected_tensors, register_cli,
                           required_bytes, storage_shape, validate_meta)
from format_models import word_tokenizer, random_tensors, small_meta, write_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    p = tmp_path_factory.mktemp("good") / "model.bin"
    tensors = write_model(p)
    return p, tensors


def test_round_trip_views_and_metadata(good):
    path, tensors = good
    with ModelFile.open(path, verify=True) as mf:
        assert mf.meta == small_meta()
        assert set(mf.tensors) == set(tensors)
        for name, (arr, scale, codes) in tensors.items():
            t = mf.tensors[name]
            a = mf.array(name)
            assert t.offset % ALIGN == 0
            assert a.shape == storage_shape(t.dtype, t.shape) and a.dtype == arr.dtype
            np.testing.assert_array_equal(a, arr)
            # a view of the mmap, not a copy
            assert not a.flags.owndata and not a.flags.writeable
            if t.dtype == "i2_b128":
                assert t.scale == np.float32(scale)
                np.testing.assert_array_equal(packing.unpack_i2(a, t.shape[1]), codes)
            else:
                assert t.scale is None
        assert mf.file_size == path.stat().st_size
        table = mf.core_tensors()
        assert table[Q0] == (mf.tensors[Q0].offset, "i2_b128", (64, 64), mf.tensors[Q0].scale)
        assert table[NORM][3] is None and len(table) == len(tensors)
        assert isinstance(mf.buffer, __import__("mmap").mmap)


def test_chunked_write_is_identical(good, tmp_path):
    path, tensors = good
    p2 = tmp_path / "m.bin"
    write_model(p2, tensors=tensors, chunked=True)
    assert p2.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("lm_head,tied", [("i8", True), ("i8", False), ("f16", False)])
def test_lm_head_variants(tmp_path, lm_head, tied):
    meta = small_meta(quant={"weights": "i2_b128", "lm_head": lm_head}, tie_word_embeddings=tied)
    p = tmp_path / "m.bin"
    write_model(p, meta)
    with ModelFile.open(p) as mf:
        assert mf.tensors["lm_head.weight"].dtype == lm_head
        assert mf.tensors["lm_head.weight"].shape == (100, 64)
        assert ("lm_head.scale" in mf.tensors) == (lm_head == "i8")


def _i8_meta(tied=True, lm_head="i8", **over):
    return small_meta(quant={"weights": "i2_b128", "lm_head": lm_head, "embedding": "i8"},
                      tie_word_embeddings=tied, **over)


EMB, EMB_S, HEAD, HEAD_S = "model.embed_tokens.weight", "model.embed_tokens.scale", "lm_head.weight", "lm_head.scale"


@pytest.mark.parametrize("tied,lm_head", [(True, "i8"), (False, "f16"), (False, "i8")])
def test_int8_embedding_round_trip(tmp_path, tied, lm_head, capsys):
    """quant.embedding "i8": tied + i8 lm_head is ONE int8 table (no model.embed_tokens.*);
    untied has its own int8 table + per-row scales; the bytes the reader requires are exact."""
    meta = _i8_meta(tied, lm_head)
    p = tmp_path / "m.bin"
    tensors = write_model(p, meta)
    with ModelFile.open(p, verify=True) as mf:
        assert mf.meta["quant"]["embedding"] == "i8"
        for name, (arr, _, _) in tensors.items():
            np.testing.assert_array_equal(mf.array(name), arr)
        if tied:
            assert EMB not in mf.tensors and EMB_S not in mf.tensors
            assert embedding_table(mf.meta) == (HEAD, HEAD_S)
        else:
            assert (mf.tensors[EMB].dtype, mf.tensors[EMB].shape) == ("i8", (100, 64))
            assert (mf.tensors[EMB_S].dtype, mf.tensors[EMB_S].shape) == ("f32", (100,))
            assert embedding_table(mf.meta) == (EMB, EMB_S)
            assert mf.tensors[HEAD].dtype == lm_head and (HEAD_S in mf.tensors) == (lm_head == "i8")
        assert required_bytes(mf.meta) == sum(t.nbytes for t in mf.tensors.values())
        assert "  embedding: i8, rows of " + embedding_table(mf.meta)[0] in describe(mf)
    # the same model with an f16 embedding: the i8 file is smaller by the f16 table minus what it adds
    f16 = small_meta(quant={"weights": "i2_b128", "lm_head": lm_head}, tie_word_embeddings=tied)
    saved = 100 * 64 * 2 - (0 if tied else 100 * 64 + 100 * 4)
    assert required_bytes(f16) - required_bytes(meta) == saved
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["info", str(p), "--summary"])
    assert args.func(args) == 0 and "embedding: i8" in capsys.readouterr().out


def test_embedding_key_absent_is_f16(good, tmp_path):
    """Files from before quant.embedding existed (no key) are f16 files, unchanged."""
    explicit = small_meta(quant={"weights": "i2_b128", "lm_head": "f16", "embedding": "f16"})
    assert "embedding" not in small_meta()["quant"]
    assert expected_tensors(explicit) == expected_tensors(small_meta())
    assert required_bytes(explicit) == required_bytes(small_meta())
    assert list(expected_tensors(small_meta()))[:2] == [EMB, NORM]  # the same file order as always
    with ModelFile.open(good[0]) as mf:
        assert mf.tensors[EMB].dtype == "f16" and embedding_table(mf.meta) == (EMB, None)
        assert "  embedding: f16, rows of model.embed_tokens.weight\n" in describe(mf)


def test_embedding_metadata_refused():
    for quant, pattern in [({"lm_head": "f16", "embedding": "i8"}, "needs quant.lm_head 'i8'"),
                           ({"lm_head": "i8", "embedding": "i4"}, "unsupported embedding"),
                           ({"lm_head": "i8", "embedding": None}, "unsupported embedding"),
                           ({"lm_head": "i8", "embedding": ["i8"]}, "unsupported embedding"),
                           ({"lm_head": "i8", "embedding": 8}, "unsupported embedding")]:
        with pytest.raises(ModelFormatError, match=pattern):
            validate_meta(small_meta(quant={"weights": "i2_b128", **quant}))
    validate_meta(_i8_meta(tied=False, lm_head="f16"))  # untied: any lm_head


def _i8_corruptions(data: bytes, tied: bool):
    """Damaged int8-embedding files (the header edited, crc fixed): name -> (bytes, error pattern)."""
    R, M = _rewrite_header, (lambda **kv: (lambda h: h["meta"]["quant"].update(**kv)))  # noqa: E731
    scale = HEAD_S if tied else EMB_S
    cases = {
        "scale missing": (R(data, lambda h: h["tensors"].remove(_tensor(h, scale))), f"{scale}' is missing"),
        "scale as f16": (R(data, _set(scale, "dtype", "f16")), "nbytes"),
        "scale as f16 with its nbytes": (R(data, lambda h: _tensor(h, scale).update(dtype="f16", nbytes=200)),
                                         "expected f32"),
        "scale one short": (R(data, lambda h: _tensor(h, scale).update(shape=[99], nbytes=396)), "expected f32"),
        "scale 2-D": (R(data, lambda h: _tensor(h, scale).update(shape=[100, 1])), "expected f32"),
        "unknown embedding dtype": (R(data, M(embedding="i4")), "unsupported embedding"),
        "embedding dtype as a number": (R(data, M(embedding=8)), "unsupported embedding"),
        "meta says f16": (R(data, M(embedding="f16")), "call for .* bytes|missing|expected f16"),
    }
    if tied:
        cases["tied with an f16 lm_head"] = (R(data, M(lm_head="f16")), "needs quant.lm_head 'i8'")
        cases["scale renamed to the embedding's"] = (R(data, _set(HEAD_S, "name", EMB_S)), "missing|unexpected")
        cases["an f16 embedding left in"] = (R(data, lambda h: h["tensors"].append(
            dict(_tensor(h, NORM), name=EMB))), "unexpected|overlap")
    else:
        cases["table as f16"] = (R(data, lambda h: _tensor(h, EMB).update(dtype="f16", nbytes=12800)),
                                 "beyond the end|overlap|expected i8")
        cases["table as i8 of the wrong width"] = (R(data, lambda h: _tensor(h, EMB).update(shape=[100, 32],
                                                                                              nbytes=3200)),
                                                   "expected i8")
        cases["the embedding's scale named as the lm_head's"] = (R(data, _set(EMB_S, "name", HEAD_S)),
                                                                 "listed twice")
    return cases


@pytest.mark.parametrize("tied", [True, False])
def test_int8_embedding_bad_files(tmp_path, tied):
    p = tmp_path / "m.bin"
    write_model(p, _i8_meta(tied, "i8"))
    data = p.read_bytes()
    for label, (blob, pattern) in _i8_corruptions(data, tied).items():
        bad = tmp_path / "bad.bin"
        bad.write_bytes(blob)
        with pytest.raises(ModelFormatError, match=pattern) as ei:
            ModelFile.open(bad).close()
        assert str(bad) in str(ei.value), label
    # an i8 header over an f16 file's tensors: the f16 embedding is unexpected, the scales are missing
    f16 = tmp_path / "f16.bin"
    write_model(f16, small_meta(quant={"weights": "i2_b128", "lm_head": "i8"}, tie_word_embeddings=tied))
    blob = _rewrite_header(f16.read_bytes(), lambda h: h["meta"]["quant"].update(embedding="i8"))
    bad.write_bytes(blob)
    with pytest.raises(ModelFormatError, match="unexpected|missing|expected i8"):
        ModelFile.open(bad).close()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_int8_embedding_nonfinite_scale_caught_by_verify(tmp_path, value):
    """A NaN / Inf row scale makes NaN hidden states (no crash): a plain open does not read the data,
    verify() (and `bitdlm info --verify`) refuses it, as for every float tensor. A negative or zero
    scale is a valid table (the row negated / zero) and is not refused."""
    for tied in (True, False):
        meta = _i8_meta(tied, "i8")
        tensors = random_tensors(meta)
        name = embedding_table(meta)[1]
        sc = np.abs(tensors[name][0])
        sc[7] = value
        tensors[name] = (sc, None, None)
        p = tmp_path / f"nan{tied}.bin"
        write_model(p, meta, tensors)
        ModelFile.open(p).close()
        with pytest.raises(ModelFormatError, match=f"{name}' holds NaN or Inf"):
            ModelFile.open(p, verify=True)
        sc[7] = -0.5
        sc[8] = 0.0
        p.unlink()
        write_model(p, meta, tensors)
        ModelFile.open(p, verify=True).close()


def test_writer_failures_leave_nothing(tmp_path):
    meta = small_meta()
    tensors = random_tensors(meta)
    specs = expected_tensors(meta)
    p = tmp_path / "m.bin"
    # an exception inside the block: no output, no temporary file
    with pytest.raises(RuntimeError):
        with ModelWriter(p, meta, specs) as w:
            w.write("model.norm.weight", tensors["model.norm.weight"][0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # forgetting tensors is refused at commit
    with pytest.raises(ValueError, match="not written"):
        with ModelWriter(p, meta, specs) as w:
            w.commit()
    # wrong dtype / size / missing scale are refused
    with ModelWriter(p, meta, specs) as w:
        with pytest.raises(TypeError):
            w.write("model.norm.weight", np.zeros(64, np.float16))
        with pytest.raises(ValueError, match="bytes"):
            w.write("model.norm.weight", np.zeros(63, np.float32))
        name = "model.layers.0.mlp.up_proj.weight"
        with pytest.raises(ValueError, match="scale"):
            w.write(name, tensors[name][0])
    assert list(tmp_path.iterdir()) == []
    # existing output is not overwritten unless asked
    p.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        ModelWriter(p, meta, specs)
    assert p.read_bytes() == b"keep"
    # bad metadata is refused before anything is written
    with pytest.raises(ModelFormatError, match="hidden_act"):
        ModelWriter(tmp_path / "x.bin", small_meta(hidden_act="gelu"), specs)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.bin"]


# ----------------------------------------------------------------------------- bad files

def _preamble(data: bytes):
    return struct.unpack_from("<8sIIQ", data, 0)


def _rewrite_header(data: bytes, edit) -> bytes:
    """Apply `edit(header_dict)` and store the header back with a valid crc."""
    magic, ver, _crc, hlen = _preamble(data)
    header = json.loads(data[PREAMBLE_SIZE:PREAMBLE_SIZE + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    assert len(raw) <= hlen
    raw += b" " * (hlen - len(raw))
    return struct.pack("<8sIIQ", magic, ver, zlib.crc32(raw), hlen) + raw + data[PREAMBLE_SIZE + hlen:]


def _raw_header_with_crc(data: bytes, raw: bytes) -> bytes:
    magic, ver, _crc, hlen = _preamble(data)
    assert len(raw) <= hlen
    raw = raw + b" " * (hlen - len(raw))
    return struct.pack("<8sIIQ", magic, ver, zlib.crc32(raw), hlen) + raw + data[PREAMBLE_SIZE + hlen:]


def _tensor(header, name):
    return next(t for t in header["tensors"] if t["name"] == name)


def _set(name, key, value):
    def edit(h):
        _tensor(h, name)[key] = value
    return edit


Q0 = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def _corruptions(data: bytes):
    hlen = _preamble(data)[3]
    data_off = json.loads(data[PREAMBLE_SIZE:PREAMBLE_SIZE + hlen])["data_offset"]
    size = len(data)
    cases = {}
    for cut in (0, 4, 8, 23, 24, 100, PREAMBLE_SIZE + hlen - 1, data_off, data_off + 1000, size - 1):
        cases[f"truncated@{cut}"] = (data[:cut], "truncated|bad magic")
    flipped = bytearray(data)
    flipped[0] ^= 0xFF
    cases["flipped magic"] = (bytes(flipped), "bad magic")
    cases["text-mode mangled"] = (data.replace(b"\r\n", b"\n", 1), "bad magic")
    cases["future version"] = (data[:8] + struct.pack("<I", VERSION + 1) + data[12:], "version")
    cases["absurd header length"] = (data[:16] + struct.pack("<Q", 1 << 50) + data[24:], "header length")
    cases["zero header length"] = (data[:16] + struct.pack("<Q", 0) + data[24:], "header length")
    cases["header longer than file"] = (data[:16] + struct.pack("<Q", size) + data[24:], "truncated")
    hdr = bytearray(data)
    hdr[PREAMBLE_SIZE + 40] ^= 0x01
    cases["flipped header byte"] = (bytes(hdr), "crc32")
    cases["invalid JSON"] = (_raw_header_with_crc(data, b"{not json"), "JSON")
    cases["JSON array"] = (_raw_header_with_crc(data, b"[1, 2]"), "not a bitdlm header")
    cases["trailing garbage"] = (data + b"\0" * 64, "does not match")
    cases["random bytes"] = (np.random.default_rng(1).bytes(4096), "bad magic")
    cases["gguf file"] = (b"GGUF" + b"\3\0\0\0" + bytes(100), "GGUF")
    cases["safetensors file"] = (struct.pack("<Q", 2) + b"{}", "safetensors")
    cases["empty file"] = (b"", "truncated")
    R = _rewrite_header
    cases["missing tensor"] = (R(data, lambda h: h["tensors"].remove(_tensor(h, Q0))), "missing")
    cases["extra tensor"] = (R(data, lambda h: h["tensors"].append(
        dict(_tensor(h, NORM), name="model.extra.weight", offset=_tensor(h, Q0)["offset"]))), "overlap|unexpected")
    cases["shape mismatch"] = (R(data, _set(Q0, "shape", [32, 64])), "nbytes|expected")
    cases["shape and nbytes mismatch"] = (R(data, lambda h: _tensor(h, Q0).update(shape=[32, 64], nbytes=1024)),
                                          "expected i2_b128")
    cases["wrong dtype"] = (R(data, _set(NORM, "dtype", "f16")), "nbytes|expected")
    cases["unknown dtype"] = (R(data, _set(NORM, "dtype", "q4_0")), "unknown dtype")
    cases["misaligned offset"] = (R(data, lambda h: _tensor(h, NORM).update(offset=_tensor(h, NORM)["offset"] + 4)),
                                  "aligned")
    cases["offset past the end"] = (R(data, _set(NORM, "offset", size + 64 - size % 64)), "beyond the end")
    cases["overlapping tensors"] = (R(data, lambda h: _tensor(h, NORM).update(offset=_tensor(h, Q0)["offset"])),
                                    "overlap")
    cases["bad scale"] = (R(data, _set(Q0, "scale", -1.0)), "scale")
    cases["missing scale"] = (R(data, lambda h: _tensor(h, Q0).pop("scale")), "scale")
    cases["bad metadata"] = (R(data, lambda h: h["meta"].update(num_key_value_heads=3)), "multiple")
    cases["missing metadata key"] = (R(data, lambda h: h["meta"].pop("vocab_size")), "vocab_size")
    cases["eos out of vocab"] = (R(data, lambda h: h["meta"].update(eos_token_ids=[100])), "token id")
    cases["foreign architecture"] = (R(data, lambda h: h["meta"].update(architecture="llama")), "architecture")
    cases["bad data_offset"] = (R(data, lambda h: h.update(data_offset=3)), "data_offset")
    # every dimension is bounded before anything is sized from it (2^31 layers
    # used to build a 2^31-entry tensor list)
    M = lambda **kv: (lambda h: h["meta"].update(**kv))  # noqa: E731
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings"):
        cases[f"{key} 2^31"] = (R(data, M(**{key: 2**31})), f"{key}.*integer in")
        cases[f"{key} bool"] = (R(data, M(**{key: True})), f"{key}.*integer")
    cases["layers past the file"] = (R(data, M(num_hidden_layers=1000)), "call for .* bytes")
    cases["vocab past the file"] = (R(data, M(vocab_size=1 << 20)), "call for .* bytes")
    cases["odd head_dim"] = (R(data, M(head_dim=15)), "even")
    cases["heads * head_dim != hidden"] = (R(data, M(head_dim=8)), "must equal hidden_size")
    cases["int past the float range"] = (R(data, M(rope_theta=10**400)), "rope_theta")
    cases["eps that is 0 in float32"] = (R(data, M(rms_norm_eps=1e-60)), "rms_norm_eps")
    cases["NaN threshold"] = (R(data, lambda h: h["meta"]["diffusion"].update(threshold=float("nan"))), "threshold")
    cases["huge block size"] = (R(data, lambda h: h["meta"]["diffusion"].update(block_size=2**31)), "block_size")
    cases["eos list too long"] = (R(data, M(eos_token_ids=[0] * 300)), "eos_token_ids")
    cases["eos float"] = (R(data, M(eos_token_ids=[0.0])), "token id")
    cases["deep nesting"] = (R(data, M(source=json.loads("[" * 40 + "]" * 40))), "nests deeper")
    cases["nesting past the parser's recursion limit"] = (
        _raw_header_with_crc(data, b'{"format": "bitdlm", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"), "JSON")
    cases["4300-digit integer"] = (_raw_header_with_crc(data, b'{"format": "bitdlm", "x": ' + b"9" * 4400 + b"}"),
                                   "JSON")
    cases["file_size float"] = (R(data, lambda h: h.update(file_size=float(size))), "does not match")
    cases["huge shape"] = (R(data, lambda h: _tensor(h, NORM).update(shape=[2**40, 2**40], nbytes=2**82)),
                           "bad shape")
    cases["int64-wrapping shape"] = (R(data, lambda h: _tensor(h, NORM).update(shape=[2**32, 2**32, 2**2])),
                                     "bad shape")
    cases["scale past float32"] = (R(data, _set(Q0, "scale", 1e39)), "scale")
    cases["scale that is 0 in float32"] = (R(data, _set(Q0, "scale", 1e-50)), "scale")
    cases["scale huge int"] = (R(data, _set(Q0, "scale", 10**400)), "scale")
    cases["negative crc"] = (R(data, _set(NORM, "crc32", -1)), "crc32")
    cases["dtype list"] = (R(data, _set(NORM, "dtype", ["f32"])), "unknown dtype")
    cases["too many tensors"] = (R(data, lambda h: h["tensors"].extend(
        [dict(_tensor(h, NORM), name=f"x{i}") for i in range(5)])), "unexpected")
    cases["long tensor name"] = (R(data, lambda h: _tensor(h, NORM).update(name="n" * 300)), "malformed")
    return cases


def test_bad_files_table(good, tmp_path):
    data = good[0].read_bytes()
    cases = _corruptions(data)
    assert len(cases) > 30
    for label, (blob, pattern) in cases.items():
        p = tmp_path / "bad.bin"
        p.write_bytes(blob)
        with pytest.raises(ModelFormatError, match=pattern) as ei:
            ModelFile.open(p).close()
        assert isinstance(ei.value, ValueError), label
        assert str(p) in str(ei.value), label


def test_limits_at_write_time(tmp_path):
    """The writer runs the same validation: no file is made from out-of-bounds metadata."""
    from bitdlm.format import MAX_CHAT_TEMPLATE_CHARS, MAX_TOKENIZER_CHARS, validate_meta

    for over, pattern in [({"chat_template": "x" * (MAX_CHAT_TEMPLATE_CHARS + 1)}, "chat_template"),
                          ({"tokenizer_json": " " * (MAX_TOKENIZER_CHARS + 1)}, "tokenizer_json"),
                          ({"hidden_size": 2**31}, "hidden_size"), ({"head_dim": 7}, "even"),
                          ({"source": json.loads("[" * 40 + "]" * 40)}, "nests deeper")]:
        with pytest.raises(ModelFormatError, match=pattern):
            validate_meta(small_meta(**over))
    validate_meta(small_meta())
    # a tokenizer within its own limit whose UTF-8 still overflows the header limit
    meta = small_meta(tokenizer_json="\u4e2d" * (23 << 20))
    with pytest.raises(ModelFormatError, match="header would take"):
        ModelWriter(tmp_path / "big.bin", meta, expected_tensors(meta))
    assert list(tmp_path.iterdir()) == []


def test_verify_checks_the_tokenizer(good, tmp_path):
    data = good[0].read_bytes()
    for tok, pattern in [("{not json", "cannot be loaded"), (word_tokenizer(101), "101 tokens")]:
        p = tmp_path / "t.bin"
        p.write_bytes(_rewrite_header(data, lambda h: h["meta"].update(tokenizer_json=tok)))
        ModelFile.open(p).close()  # a plain open does not parse the tokenizer
        with pytest.raises(ModelFormatError, match=pattern):
            ModelFile.open(p, verify=True)


def test_not_a_regular_file():
    with pytest.raises(ModelFormatError, match="regular file"):
        ModelFile.open("/dev/null")


def test_info_cli_bad_file_one_line(good, tmp_path):
    """`bitdlm info bad.bin`: exit 2, one line on stderr, no traceback."""
    import subprocess
    import sys

    from hf_models import child_env

    data = good[0].read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_rewrite_header(data, lambda h: h["meta"].update(num_hidden_layers=2**31)))
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "info", str(bad)], capture_output=True,
                       text=True, env=child_env(), timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("bitdlm info: error: ") and "num_hidden_layers" in r.stderr


def test_generate_cli_broken_tokenizer_one_line(good, tmp_path):
    """A file whose tokenizer_json `tokenizers` cannot load: `bitdlm generate` exits 2 with one
    line (the tokenizer is parsed lazily, after the plain open has succeeded)."""
    import subprocess
    import sys

    from hf_models import child_env

    bad = tmp_path / "badtok.bin"
    bad.write_bytes(_rewrite_header(good[0].read_bytes(), lambda h: h["meta"].update(tokenizer_json="{not json")))
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "hello", "--model", str(bad),
                        "--max-tokens", "2"], capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "tokenizer" in r.stderr


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="no such model file"):
        ModelFile.open(tmp_path / "nope.bin")
    with pytest.raises(ModelFormatError, match="directory"):
        ModelFile.open(tmp_path)


def test_data_corruption_caught_by_verify(good, tmp_path):
    data = bytearray(good[0].read_bytes())
    data[-10] ^= 0x40  # inside the last tensor
    p = tmp_path / "c.bin"
    p.write_bytes(bytes(data))
    ModelFile.open(p).close()  # structure is intact: cheap open succeeds
    with pytest.raises(ModelFormatError, match="corrupted"):
        ModelFile.open(p, verify=True)


def test_info_command(good, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["info", str(good[0]), "--verify"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 64" in out and "i2_b128" in out and "checksums: OK" in out
    assert Q0 in out and "scale=" in out
    assert '"vocab"' not in out  # the tokenizer itself is not dumped
    args = parser.parse_args(["info", "/nonexistent/model.bin"])
    assert args.func(args) == 2
    assert "no such model file" in capsys.readouterr().err
    with ModelFile.open(good[0]) as mf:
        assert "tensors: " in describe(mf, show_tensors=False)


def test_close_with_live_views(good):
    mf = ModelFile.open(good[0])
    a = mf.array(NORM)
    mf.close()  # must not raise although `a` still references the mapping
    assert a.shape == (64,)
    with pytest.raises(KeyError):
        ModelFile.open(good[0]).array("nope")


def test_restore_vocab_script(good, tmp_path):
    """scripts/restore_vocab.py: the tables re-stored from the rows a .bin holds, everything else copied."""
    import importlib.util
    from pathlib import Path

    from bitdlm.convert.tensors import quantize_lm_head_i8

    spec = importlib.util.spec_from_file_location(
        "restore_vocab", Path(__file__).resolve().parent.parent / "scripts" / "restore_vocab.py")
    rv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rv)
    i8 = tmp_path / "i8.bin"
    assert rv.main([str(good[0]), str(i8), "--embedding", "i8", "--lm-head", "i8"]) == 0
    with ModelFile.open(good[0]) as a, ModelFile.open(i8, verify=True) as b:
        assert b.meta["quant"] == {"weights": "i2_b128", "lm_head": "i8", "embedding": "i8"}
        assert {k: v for k, v in a.meta.items() if k != "quant"} == {k: v for k, v in b.meta.items() if k != "quant"}
        q, s = quantize_lm_head_i8(a.array(EMB).astype(np.float32))
        np.testing.assert_array_equal(b.array(HEAD), q)
        np.testing.assert_array_equal(b.array(HEAD_S), s)
        assert set(b.tensors) == set(a.tensors) - {EMB} | {HEAD, HEAD_S}
        for name, t in a.tensors.items():
            if name != EMB:
                np.testing.assert_array_equal(a.array(name), b.array(name))
                assert b.tensors[name].scale == t.scale
    back = tmp_path / "back.bin"  # an int8 table already there is copied, not quantized again
    assert rv.main([str(i8), str(back), "--embedding", "f16", "--lm-head", "i8"]) == 0
    with ModelFile.open(i8) as b, ModelFile.open(back, verify=True) as c:
        np.testing.assert_array_equal(c.array(HEAD), b.array(HEAD))
        rows = b.array(HEAD).astype(np.float32) * b.array(HEAD_S)[:, None]
        np.testing.assert_array_equal(c.array(EMB), rows.astype(np.float16))
    assert rv.main([str(good[0]), str(tmp_path / "x.bin"), "--embedding", "i8", "--lm-head", "f16"]) == 2
    assert not (tmp_path / "x.bin").exists()
