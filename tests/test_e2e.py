"""End-to-end tooling (bench/e2e.py --tiny) and the thread defaults that keep
`bitdlm generate` from collapsing on a busy machine (bitdlm._cpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bitdlm import _cpu
from hf_models import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_default_threads_leave_the_busy_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_cpu, "physical_cores", lambda: 16)
    for load, want in ((0.0, 16), (0.4, 16), (1.0, 15), (3.6, 12), (40.0, 1)):
        monkeypatch.setattr(_cpu, "other_load", lambda load=load: load)
        assert _cpu.default_threads() == want, load
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert _cpu.default_threads() == 7  # the user's choice wins


def test_other_load_reads_the_machine():
    load = _cpu.other_load()
    assert 0.0 <= load < 10_000


@pytest.mark.parametrize("user, want", [({}, {"GOMP_SPINCOUNT": _cpu.SPIN_COUNT, "KMP_BLOCKTIME": "1"}),
                                        ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": None}),
                                        ({"GOMP_SPINCOUNT": "50"}, {"GOMP_SPINCOUNT": "50", "KMP_BLOCKTIME": None})])
def test_openmp_spin_is_bounded_unless_the_user_chose(user, want):
    # in a fresh process: the runtime reads the environment when bitdlm._core loads it
    env = {k: v for k, v in child_env().items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = ("import json, os, sys, bitdlm, bitdlm._core; "
            "print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))")
    p = subprocess.run([sys.executable, "-c", code, *want], env={**env, **user}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == want


def test_e2e_tiny(tmp_path):
    """The whole bench/e2e.py path on the tiny model: offline, through the server, spin; JSON + PNG."""
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "e2e.py"), "--tiny", "--tpf", "1,4", "--reps", "1",
           "--server-tpf", "4", "--concurrency", "2", "--server-rounds", "2", "--server-min-requests", "5",
           "--server-repeats", "2", "--server-profile", "--workdir", str(tmp_path),
           "--json", str(out), "--plot", str(png)]
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    off = {(r["mode"], r["cache"]): r for r in doc["offline"]}
    assert set(off) == {("ar", "prefix"), ("steps31", "prefix"), ("steps7", "prefix"),
                        ("steps31", "dual"), ("steps7", "dual")}
    # the fixed-rate rule sets the tokens per forward: 16 tokens after a 32-token prompt are one
    # block of 32 (its first 16 kept), ~4 per step at steps 7, ~1 at steps 31; AR: one per forward
    assert 0.9 <= off[("ar", "prefix")]["tpf"] <= 1.0  # one forward per token (the prefill gives the first)
    assert off[("steps7", "prefix")]["forwards"] < off[("steps31", "prefix")]["forwards"]
    for r in doc["offline"]:
        assert r["tokens"] == 16 and r["tok_s"] > 0 and 0 <= r["outside_ms_per_forward"] < r["ms_per_forward"]
    assert {r["cache"] for r in doc["break_even"]} == {"prefix", "dual"}
    assert all(r["break_even_tpf"] > 0 and r["cost_ratio"] > 0 for r in doc["break_even"])
    srv = {r["mode"]: r for r in doc["server"]}
    assert set(srv) == {"ar", "steps7", "adaptive-steps7"}, doc["notes"]
    # concurrency 2, two rounds: 4 requests (each client sends its next when its last is done),
    # raised to --server-min-requests 5; two interleaved repeats of each load, the row their median
    assert all(r["errors"] == 0 and r["requests"] == 10 and r["repeats"] == 2 and r["tok_s"] > 0
               for r in srv.values()), srv
    assert all(len(r["tok_s_all"]) == 2 and r["tok_s"] == pytest.approx(sum(r["tok_s_all"]) / 2)
               for r in srv.values())
    # every response says its mode: the fixed series the one asked for, the adaptive one its choice
    assert srv["ar"]["decode_modes"] == {"ar": 10} and srv["steps7"]["decode_modes"] == {"diffusion": 10}
    assert sum(srv["adaptive-steps7"]["decode_modes"].values()) == 10
    assert srv["adaptive-steps7"]["policy_state"]["calibrated"]
    # --server-profile: per engine step of a row's loads, its forwards' phases and parallel regions
    for r in srv.values():
        ps = r["per_step"]
        assert ps["steps"] > 0 and ps["forwards"] >= ps["steps"] and ps["step_ms"] > 0, ps
        assert ps["forward_phases_ms"]["lm_head"] > 0 and ps["forward_phases_ms"]["attention"] > 0, ps
        g = ps["regions_ms"]["ternary_gemm"]
        assert g["work"] > 0 and g["wall"] == pytest.approx(g["fork"] + g["work"] + g["imbalance"] + g["join"],
                                                            abs=0.01), g
    assert [r["spin"] for r in doc["spin"]] == ["bounded (bitdlm default)", "libgomp default"]
    assert png.read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "e2e.md").read_text()
    ratio = srv["adaptive-steps7"]["tok_s"] / max(srv["ar"]["tok_s"], srv["steps7"]["tok_s"])
    assert f"| 1 | 2 | adaptive-steps7 | {srv['adaptive-steps7']['tok_s']:.1f} |" in md and f"| {ratio:.3f} |" in md
    assert "| 1 | AR (block 1) |" in md and "bitdlm serve steps7" in md and "bitdlm serve adaptive-steps7" in md


def test_llama_batched_bench_output_is_read_in_both_formats():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import e2e

    md = ("|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n"
          "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|\n"
          "|    32 |     32 |    4 |    256 |    0.108 |  1186.64 |    3.079 |    41.57 |    3.187 |    80.32 |\n")
    jl = 'main: n_kv_max = 512\n{"pp": 32, "tg": 32, "pl": 4, "n_kv": 256, "speed_tg": 41.57, "speed": 80.32}\n'
    for text in (md, jl):
        (row,) = e2e.batched_rows(text)
        assert (int(row["pl"]), row["speed_tg"], row["speed"]) == (4, 41.57, 80.32)
    # a block's deciding forwards and its commit: 32 / (steps + 1) tokens per forward, >= one step per sub-block
    assert e2e.steps_for(2) == 15 and e2e.steps_for(3) == 10 and e2e.steps_for(8) == 4 and e2e.steps_for(64) == 4


def test_break_even_is_where_diffusion_reaches_ar():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import e2e

    # session 10's 16-thread dual-cache points: AR 93.4 tok/s; 91.0 at 1.88, 146.6 at 3.56 tokens per forward
    tpf, how = e2e.crossing([(3.56, 146.6), (1.88, 91.0)], 93.4)
    assert how == "interpolated" and tpf == pytest.approx(1.88 + 1.68 * 2.4 / 55.6)
    assert e2e.crossing([(2.0, 100.0), (4.0, 150.0)], 93.4) == (pytest.approx(2.0 - 2 * 6.6 / 50), "extrapolated")
    assert e2e.crossing([(2.0, 50.0), (4.0, 80.0)], 93.4) == (pytest.approx(2.0 + 2 * 43.4 / 30), "extrapolated")
    assert e2e.crossing([(2.0, 50.0)], 100.0) == (4.0, "extrapolated")


def test_llama_rows_from_both_tools(tmp_path):
    """bench/e2e.py's llama.cpp section on stand-in binaries that print what the real ones print."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import e2e

    fake = {"llama-bench": '[{"n_prompt": 0, "n_gen": 8, "avg_ts": 50.5}]',
            "llama-batched-bench": '{"pp": 16, "tg": 8, "pl": 4, "speed_tg": 120.0, "speed": 150.0}'}
    for name, out in fake.items():
        exe = tmp_path / name
        exe.write_text(f"#!/bin/sh\ncat <<'X'\n{out}\nX\n")
        exe.chmod(0o755)
    rows = e2e.llama(str(tmp_path), "m.gguf", [2], [4], 8, 16)
    assert rows == [dict(threads=2, parallel=1, tool="llama-bench", tok_s=50.5),
                    dict(threads=2, parallel=4, tool="llama-batched-bench", tok_s=120.0, tok_s_with_prompt=150.0)]
