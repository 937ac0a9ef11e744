"""Benchmark tooling: synthetic models, the GGUF export, `bitdlm bench threads`, compare.py.

Everything runs on a tiny model (hidden 256, 2 layers) with one or two threads."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import make_synthetic_model as msm  # noqa: E402
from bitdlm import bench  # noqa: E402
from bitdlm.format import ModelFile  # noqa: E402
from bitdlm.packing import unpack_i2  # noqa: E402

TINY = ["--shape", "tiny"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _bench_cli(argv) -> int:
    """`bitdlm bench ...` through this module's register_cli (as bitdlm.cli wires it)."""
    import argparse

    parser = argparse.ArgumentParser(prog="bitdlm")
    bench.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _core_ready() -> bool:
    try:
        from bitdlm import _core
    except ImportError:
        return False
    return hasattr(_core, "Model")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {}
    for lm in ("f16", "i8"):
        p = str(d / f"tiny-{lm}.bin")
        assert msm.main([p, "--lm-head", lm, "--seed", "3"] + TINY) == 0
        paths[lm] = p
    return paths


# ----------------------------------------------------------------------------- generator


def test_synthetic_model_is_a_valid_bin_with_uniform_ternary(tiny):
    with ModelFile.open(tiny["f16"], verify=True) as f:
        m = f.meta
        assert (m["hidden_size"], m["num_hidden_layers"], m["vocab_size"]) == (256, 2, 1000)
        assert "lm_head.weight" not in f.tensors  # tied f16
        name = "model.layers.1.mlp.down_proj.weight"
        codes = unpack_i2(f.array(name), 512)
        frac = np.bincount(codes.ravel() + 1, minlength=3) / codes.size
        assert np.allclose(frac, 1 / 3, atol=0.01), frac
        assert f.tensors[name].scale == pytest.approx(np.sqrt(2 * 512 / 3), rel=1e-6)
        norm = f.array("model.layers.0.input_layernorm.weight")
        assert norm.std() > 0.01  # norms are not all ones


def test_f16_and_i8_variants_hold_the_same_weights(tiny):
    with ModelFile.open(tiny["f16"]) as a, ModelFile.open(tiny["i8"]) as b:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            assert np.array_equal(a.array(name), b.array(name)), name
        emb = b.array("model.embed_tokens.weight").astype(np.float32)
        q, s = b.array("lm_head.weight"), b.array("lm_head.scale")
        assert q.dtype == np.int8 and np.abs(q).max(axis=1).min() == 127
        # int8 rows reproduce the embedding to half a quantization step
        assert np.all(np.abs(q * s[:, None] - emb) <= s[:, None] * 0.5 + 1e-7)


def test_int8_embedding_variant(tiny, tmp_path):
    """--embedding i8: the i8 variant's file less its f16 embedding, the rows read from the int8
    lm_head; needs --lm-head i8 (tied)."""
    p = str(tmp_path / "e.bin")
    assert msm.main([p, "--lm-head", "i8", "--embedding", "i8", "--seed", "3"] + TINY) == 0
    with ModelFile.open(tiny["i8"]) as a, ModelFile.open(p, verify=True) as b:
        assert b.meta["quant"]["embedding"] == "i8" and "model.embed_tokens.weight" not in b.tensors
        assert set(a.tensors) - set(b.tensors) == {"model.embed_tokens.weight"}
        for name, t in b.tensors.items():
            assert np.array_equal(a.array(name), b.array(name)), name
        assert a.file_size - b.file_size == pytest.approx(1000 * 256 * 2, abs=256)  # (header, alignment)
    with pytest.raises(SystemExit):
        msm.main([str(tmp_path / "x.bin"), "--embedding", "i8"] + TINY)


def test_seed_changes_weights(tmp_path):
    p1, p2 = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    msm.main([p1, "--seed", "1", "--layers", "1"] + TINY)
    msm.main([p2, "--seed", "2", "--layers", "1"] + TINY)
    n = "model.layers.0.mlp.up_proj.weight"
    with ModelFile.open(p1) as a, ModelFile.open(p2) as b:
        assert not np.array_equal(a.array(n), b.array(n))


def test_ragged_k_padding_is_zero():
    rng = np.random.default_rng(0)
    packed = msm.random_ternary_packed(rng, 3, 200)  # K not a multiple of 128
    assert packed.shape == (3, 256 // 4)
    full = unpack_i2(packed, 256)
    assert np.all(full[:, 200:] == 0)


# ----------------------------------------------------------------------------- GGUF export


@pytest.mark.parametrize("weights,output", [("tq2_0", "f16"), ("tq1_0", "q8_0")])
def test_gguf_export_holds_the_same_weights(tiny, tmp_path, weights, output):
    import gguf
    from gguf.quants import dequantize
    from gguf_export import export_bin

    out = str(tmp_path / "m.gguf")
    export_bin(tiny["i8"], out, weights, output, progress=False)
    r = gguf.GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "bitnet"
    assert "output.weight" not in tensors and len(tensors) == 2 + 2 * 11
    with ModelFile.open(tiny["i8"]) as f:
        for hf, gg, k in [("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 512),
                          ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight", 256)]:
            t = tensors[gg]
            assert t.tensor_type.name == weights.upper()
            got = dequantize(np.array(t.data), t.tensor_type)
            want = unpack_i2(f.array(hf), k) / np.float32(f.tensors[hf].scale)
            # identical codes; the per-tensor scale is rounded to fp16 once
            assert np.allclose(got, want, rtol=1e-3, atol=0), gg
            assert np.array_equal(np.sign(got), np.sign(want))
        t = tensors["token_embd.weight"]
        got = dequantize(np.array(t.data), t.tensor_type)
        if output == "f16":
            want = f.array("model.embed_tokens.weight").astype(np.float32)
        else:  # Q8_0 carries exactly the int8 lm_head
            want = f.array("lm_head.weight") * f.array("lm_head.scale")[:, None]
        assert t.tensor_type.name == output.upper()
        assert np.allclose(got, want, rtol=1e-3, atol=1e-6)
        assert np.array_equal(tensors["blk.0.ffn_sub_norm.weight"].data,
                              f.array("model.layers.0.mlp.ffn_sub_norm.weight"))


def test_i2_s_layout_reverses_the_fields_and_appends_the_scale():
    from gguf_export import i2_s_from_packed

    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(3, 256)).astype(np.int8)
    from bitdlm.packing import pack_i2

    out = i2_s_from_packed(pack_i2(codes), 256, 4.0)
    assert out.size == 3 * 256 // 4 + 32
    # bitnet.cpp I2_S: byte p of each 128-weight block holds weights p, p+32, p+64, p+96 at bits 6, 4, 2, 0
    u = out[:-32].reshape(-1, 1, 32) >> np.array([6, 4, 2, 0], np.uint8).reshape(1, 4, 1) & 3
    assert np.array_equal(u.reshape(3, 256).astype(np.int8) - 1, codes)
    assert out[-32:-28].view(np.float32)[0] == np.float32(0.25) and not out[-28:].any()


def test_tl2_layout_puts_single_weights_where_bitnet_cpp_reads_them():
    """Hand-placed weights in a 32 x 128 tensor (BM 32, BK 96: 96 columns of triples, a
    32-column tail of pairs); the expected bytes follow bitnet.cpp's converter layout."""
    from gguf_export import tl2_from_codes, tl2_nbytes

    t = np.zeros((32, 128), np.int8)
    t[8, 0:3] = (1, 0, 0)  # triple 0 of row 8: |9| in the high nibble, at position 16 (rows 8-15 sit at 16-23)
    t[17, 3:6] = (-1, 0, 0)  # triple 1 of row 17: |-9| low nibble at position 9, and a sign bit
    t[0, 96:98] = (1, -1)  # pair 0 of the tail, row 0: 3 - 1 + 4 = 6
    out = tl2_from_codes(t, 2.0, 32, 96)
    assert out.size == tl2_nbytes(32, 128)
    three = out[:512]  # 32 rows x 96 / 6
    assert three[16] == 9 << 4 and three[9] == 9 and np.count_nonzero(three) == 2
    sign = out[512:640]  # 32 rows x 96 / 24; word c, bit 15 - (2q + h) for row 16h + c, triple q
    assert sign[3] == 0x10 and np.count_nonzero(sign) == 1
    pairs = out[640:648]
    assert pairs[0] == 0x64 and pairs[1] == 0x44  # zero pairs are 4
    assert out[-32:-28].view(np.float32)[0] == np.float32(0.5)


def test_bitnet_trim_blocks_and_kernel_edits():
    import bitnet_trim as bt

    # 2B shapes: row tiles that split evenly (or best) over 16 threads
    assert [bt.tl2_bm(m) for m in (2560, 640, 6912)] == [160, 64, 64]
    gen = b"""    __m256 vec_lut[16];
    __m256 vec_lut[16];
            ((int32_t*)C)[i] = (int32_t)(((int32_t*)CBits)[i + bs * BM640_2560]);
            ((int32_t*)C)[i] += (int32_t)(((int32_t*)CBits)[i + bs * BM640_2560]);
            ((float*)C)[i] = (float)(((int32_t*)C)[i]) / ((float*)LUT_Scales)[bs] * ((float*)Scales)[0];
"""
    out = bt.patch_tl2(gen, 1)
    assert out.count(b"__m256i vec_lut[16];") == 2
    assert b"((int32_t*)C)[i + bs * 640] = (int32_t)" in out and b"((int32_t*)C)[i + bs * 640] += " in out
    assert b"((float*)C)[i + bs * 640] = (float)(((int32_t*)C)[i + bs * 640]) / " in out
    with pytest.raises(SystemExit):  # another generator version must not be patched silently
        bt.patch_tl2(gen, 2)


# ----------------------------------------------------------------------------- pure helpers


def test_default_thread_counts_and_parse():
    assert bench.default_thread_counts(2) == [1, 2, 4]
    assert bench.default_thread_counts(1) == [1, 2]
    assert bench.physical_cores() >= 1
    assert bench.parse_threads("4,1,2,2") == [1, 2, 4]
    import argparse

    for bad in ("0", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_threads(bad)


def test_threads_rows_speedup_and_efficiency():
    res = {t: {p: {"median_ms": ms} for p in bench.PHASES} for t, ms in ((1, 100.0), (2, 60.0), (4, 80.0))}
    rows = {(r["phase"], r["threads"]): r for r in bench.threads_rows(res, prompt=64)}
    assert rows[("decode", 2)]["speedup"] == pytest.approx(100 / 60)
    assert rows[("decode", 2)]["efficiency"] == pytest.approx(100 / 60 / 2)
    assert rows[("step32", 1)]["tokens_per_s"] == pytest.approx(32 / 0.1)
    assert rows[("prefill", 4)]["tokens_per_s"] == pytest.approx(64 / 0.08)
    assert "efficiency" in bench.format_table(list(rows.values()))


def test_economics_break_even():
    import compare

    cases = {"decode@0": {"median_ms": 10.0}, "subblock@0": {"median_ms": 20.0}, "block@0": {"median_ms": 40.0}}
    e = compare.economics(cases, [0])["0"]
    assert e["break_even_per_step"] == {"N=8": 2.0, "N=32": 4.0}
    # full block: (32/k + 1) * 40 = 320  ->  k = 32 / 7
    assert e["break_even_per_block"]["full_block"] == pytest.approx(32 / 7)
    # sub-block cache: 5*40 + (32/k - 4)*20 = 320  ->  k = 32*20 / (320 - 200 + 80)
    assert e["break_even_per_block"]["sub_block_cache"] == pytest.approx(640 / 200)
    slow = {"decode@0": {"median_ms": 1.0}, "subblock@0": {"median_ms": 20.0}, "block@0": {"median_ms": 40.0}}
    assert compare.economics(slow, [0])["0"]["break_even_per_block"]["full_block"] is None


# ----------------------------------------------------------------------------- end to end (need the C++ forward)

needs_core = pytest.mark.skipif(not _core_ready(), reason="bitdlm._core.Model not built (./scripts/dev_build.sh)")


@pytest.mark.slow
@needs_core
def test_bench_threads_cli_writes_json_and_png(tiny, tmp_path):
    js, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = _bench_cli(["bench", "threads", "--model", tiny["f16"], "--threads", "1,2", "--reps", "2",
               "--prompt", "16", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert sorted(doc["results"]) == ["1", "2"]
    assert {r["phase"] for r in doc["rows"]} == set(bench.PHASES)
    for r in doc["rows"]:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0
        assert doc["results"][str(r["threads"])][r["phase"]]["reps"] == 2
    base = [r for r in doc["rows"] if r["threads"] == 1]
    assert all(r["speedup"] == pytest.approx(1.0) for r in base)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_threads_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such model file"):
        _bench_cli(["bench", "threads", "--model", str(tmp_path / "nope.bin")])


@pytest.mark.slow
@needs_core
def test_compare_tiny_end_to_end(tmp_path):
    """compare.py on the tiny shape: bitdlm, and llama.cpp when llama-cpp-python is installed."""
    js, png, md = tmp_path / "c.json", tmp_path / "c.png", tmp_path / "c.md"
    cmd = [sys.executable, os.path.join(BENCH, "compare.py"), "--shape", "tiny", "--threads", "1",
           "--reps", "2", "--ctx", "0,40", "--precision", "f16", "--torch-layers", "0",
           "--workdir", str(tmp_path), "--json", str(js), "--plot", str(png), "--md", str(md)]
    if not _have("llama_cpp"):
        cmd.append("--no-llama")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(js.read_text())
    (group,) = doc["groups"].values()
    engines = list(group["cases"])
    assert engines[0] == "bitdlm f16"
    assert len(engines) == (2 if _have("llama_cpp") else 1)
    for per in group["cases"].values():
        assert set(per) == {f"{k}@{c}" for k in ("decode", "subblock", "block") for c in (0, 40)}
        assert all(v["median_ms"] > 0 and v["reps"] == 2 for v in per.values())
    econ = doc["economics"]["by_ctx"]
    assert set(econ) == {"0", "40"}
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "32-token block" in md.read_text()


@needs_core
@pytest.mark.torch
def test_pytorch_reference_runs_the_same_weights(tiny):
    """compare.py's PyTorch reference, loaded from the .bin, agrees with bitdlm's logits."""
    import torch

    import bitdlm
    import compare

    ref = compare.TorchRunner(tiny["f16"], threads=1)
    ids = np.array([5, 17, 300, 42, 999, 7, 64, 128], dtype=np.int64)
    with torch.inference_mode():
        want = ref.model(input_ids=torch.as_tensor(ids)[None]).logits[0].float().numpy()
    got = bitdlm.load(tiny["f16"], threads=1).logits(ids.astype(np.int32))
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_kernels_ceilings_only_writes_the_ceilings_json(tmp_path):
    """bench/native_compare.py's call: `bench/kernels.py --ceilings-only --threads 1,N --json PATH`
    measures the ceilings only and writes them keyed by thread count; a module built without the
    bench-only kernels (the shipped one) gets a one-line error naming the build switch."""
    out = tmp_path / "k.json"
    from hf_models import child_env

    from bitdlm import _core

    env = child_env()  # the same bitdlm as the tests (the installed wheel in CI)
    cmd = [sys.executable, os.path.join(BENCH, "kernels.py"), "--ceilings-only", "--quick", "--threads", "1",
           "--json", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if not _core.build_info()["bench_kernels"]:
        assert r.returncode != 0 and "Traceback" not in r.stderr and not out.exists()
        assert r.stderr.strip().splitlines()[-1].endswith("(cmake -DBITDLM_BENCH_KERNELS=ON)")
        return
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["ceilings"]) == {"1"} and res["gemm"] == [] and res["decode_30_layers"] == []
    c = res["ceilings"]["1"]
    assert c["read_GBps"] > 0 and c["int8_GMACps"] > 0


def test_kernels_smallops_only_times_the_row_drivers(tmp_path):
    """`bench/kernels.py --smallops-only` (bench/device_kernels.sh's small-op step) times the three row
    drivers at N 1 / 8 / 32 in both layouts and writes them with the per-forward total."""
    from hf_models import child_env

    from bitdlm import _core

    if not _core.build_info()["bench_kernels"]:
        pytest.skip("the shipped module has no bench kernels (covered by the ceilings test's error check)")
    out = tmp_path / "s.json"
    cmd = [sys.executable, os.path.join(BENCH, "kernels.py"), "--smallops-only", "--threads", "1", "--json", str(out)]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["small_ops"]
    assert sorted((e["N"], e["layout"]) for e in rows) == sorted((n, lay) for n in (1, 8, 32) for lay in ("gemm", "rows"))
    for e in rows:
        us = e["us"]
        # real rows cost more than an empty region; the total is the 2B shape's 90 + 30 calls
        assert us["add_norm_quant"] > us["empty"] and us["act_norm_quant"] > 0
        assert e["per_forward_ms"] == pytest.approx((90 * us["add_norm_quant"] + 30 * us["act_norm_quant"]) / 1e3)


def test_host_probe_reports_omp_costs_and_refuses_an_unfit_host(tmp_path):
    """`bench/host_probe.py` (the device scripts' first step): the fork and barrier costs per thread
    count into its JSON, exit status 3 when the fork is above --max-fork-us; the shipped module (no
    bench kernels) gets exit status 2 and the build switch, no traceback."""
    from hf_models import child_env

    from bitdlm import _core

    out = tmp_path / "p.json"
    cmd = [sys.executable, os.path.join(BENCH, "host_probe.py"), "--threads", "1", "--reps", "200", "--json", str(out)]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    if not _core.build_info()["bench_kernels"]:
        assert r.returncode == 2 and "BITDLM_BENCH_KERNELS=1" in r.stdout and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["fit"] and [row["threads"] for row in res["rows"]] == [1]
    assert res["rows"][0]["fork_us"] > 0 and res["rows"][0]["barrier_us"] > 0
    r = subprocess.run(cmd + ["--max-fork-us", "0"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "UNFIT" in r.stdout and not json.loads(out.read_text())["fit"]


def test_gemm_ab_compares_builds_side_by_side(tmp_path):
    """`bench/gemm_ab.py`: two copies of this build's extension (loaded as separate modules) give
    equal outputs and a ratio line each; one layer, one repetition."""
    import shutil

    from hf_models import child_env

    from bitdlm import _core

    copies = [tmp_path / f"core{i}.so" for i in range(2)]
    for c in copies:
        shutil.copy(_core.__file__, c)
    cmd = [sys.executable, os.path.join(BENCH, "gemm_ab.py"), *map(str, copies), "--layers", "1", "--reps", "1",
           "--n", "3"]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if "GB/s" in ln]
    assert len(lines) == 2 and lines[0].rstrip().endswith("x1.000"), r.stdout
    assert "1 layers' GEMMs" in r.stdout and "N=3" in r.stdout


def test_forward_ab_runs_builds_on_one_model(tiny):
    """`bench/forward_ab.py`: two copies of this build, each its own `_core.Model` over one mapped
    file, time the same forwards and select the same tokens; the build's file named twice works too
    (each is loaded from a private copy)."""
    from hf_models import child_env

    from bitdlm import _core

    cmd = [sys.executable, os.path.join(BENCH, "forward_ab.py"), _core.__file__, _core.__file__, "--model",
           tiny["i8"], "--reps", "1", "--cases", "decode_ctx512,sub8_ctx512"]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("x1.000") >= 2 and "sub8_ctx512:" in r.stdout, r.stdout
    assert "same tokens selected by every build: True" in r.stdout


def test_overhead_adaptive_ar_mode_decodes_every_request_as_ar(tmp_path):
    """bench/overhead.py --mode adaptive-ar: an adaptive engine that assigns every request AR
    gives the plain AR mode's outputs (the A/B of the policy's cost is like for like)."""
    import overhead

    hashes = {}
    for mode in ("ar", "adaptive-ar"):
        out = tmp_path / f"{mode}.json"
        assert overhead.main(["--fake", "--threads", "1", "--batch", "8", "--mode", mode, "--max-tokens", "6",
                              "--reps", "1", "--json", str(out)]) == 0
        row = json.loads(out.read_text())["rows"][0]
        hashes[mode] = row["outputs_hash"], row["forwards"]
    assert hashes["ar"] == hashes["adaptive-ar"]
