"""bitdlm beside llama.cpp's llama-bench on one machine, in one command.

Made for the users' kind of machine (AVX-512 / AMX cloud VMs), where nothing can be
installed: it builds llama-bench from the trimmed llama.cpp source
(bench/llama_trim.py), makes the 2B-shaped synthetic model and its GGUF twin
(TQ2_0 ternary weights, Q8_0 output layer, the same codes as bitdlm's int8 lm_head),
measures the machine's ceilings (bench/kernels.py: read bandwidth, VNNI and AMX
int8 peaks), then times, alternating engines per repetition:

  bitdlm   decode      1 token against CTX cached, written to the cache
           subblock    8 tokens against the block's cached K/V (the sub-block cache step)
           block       32 tokens against CTX cached, logits of the 8 positions of the
                       current sub-block (a Fast-dLLM v2 full-block step)
           at every thread count of --threads, and for every ISA of --isas at the
           largest thread count;
  llama.cpp pp32 (32 prompt tokens after CTX of depth) and tg (one token per
           forward after CTX of depth), same thread counts;
  bitnet.cpp (with --bitnet-archive, bench/bitnet_trim.py) the same pp32 and tg with its
           I2_S and TL2 kernels on GGUFs of the same weights, through
           bench/llama_depth.cpp (its llama-bench has no depth option), same thread
           counts; before timing, the logits of a few tokens from its I2_S, TL2 and
           TQ2_0 models are compared (correlation with TQ2_0, printed and in the JSON).

It writes JSON (--json) and a plot (--plot), and prints a table with the ratios,
break-even tokens per forward (step ms / decode ms) and the parallel efficiency
of the 32-token step.

    python bench/native_compare.py --llama-archive bench/out/llama-cpu.tar.gz \
        [--bitnet-archive bench/out/bitnet-cpu.tar.gz] --threads 1,2,4,8,16 --reps 5 --json out.json --plot out.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = os.path.join(ROOT, "python")

BLOCK, SUB = 32, 8


def env_for(threads: int, isa: str | None = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    import glob

    if glob.glob(os.path.join(PY, "bitdlm", "_core*.so")):  # an in-tree build (dev_build.sh) goes first
        env["PYTHONPATH"] = PY + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("BITDLM_ISA", None)
    if isa:
        env["BITDLM_ISA"] = isa
    return env


# ----------------------------------------------------------------------------- bitdlm worker

WORKER = r"""
import json, sys, time
import numpy as np
import bitdlm
from bitdlm import _core
path, ctx, reps, block, sub = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
m = bitdlm.load(path)
V = int(m.meta["vocab_size"])
mask = m.meta.get("mask_token_id")
banned = None if mask is None else [int(mask)]
rng = np.random.default_rng(0)
sid = m.alloc_seq(ctx + block)
for s in range(0, ctx + block, 512):
    n = min(512, ctx + block - s)
    m.forward([(sid, rng.integers(0, V - 8, n, dtype=np.int32), s, s, True, np.array([n - 1], np.int32))],
              block, "select", banned=banned)
cases = {
    "decode": (1, ctx, ctx, True, [0]),
    "subblock": (sub, ctx + sub, ctx + block, False, list(range(sub))),
    "block": (block, ctx, ctx, False, list(range(sub))),
}
out = {"isa": _core.active_isa(), "threads": _core.get_max_threads() if hasattr(_core, "get_max_threads") else None}
for name, (n, start, ctx_len, write, idx) in cases.items():
    ms = []
    for r in range(reps + 1):  # first one warms up
        toks = rng.integers(0, V - 8, n, dtype=np.int32)
        t0 = time.perf_counter()
        m.forward([(sid, toks, start, ctx_len, write, np.array(idx, np.int32))], block, "select", banned=banned)
        if r:
            ms.append((time.perf_counter() - t0) * 1e3)
    out[name] = ms
print("RESULT " + json.dumps(out))
"""


def run_bitdlm(model: str, threads: int, isa: str | None, ctx: int, reps: int) -> dict:
    p = subprocess.run([sys.executable, "-c", WORKER, model, str(ctx), str(reps), str(BLOCK), str(SUB)],
                       env=env_for(threads, isa), capture_output=True, text=True, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bitdlm worker failed (threads {threads}, isa {isa}):\n{p.stderr[-2000:]}")


# ----------------------------------------------------------------------------- llama.cpp

def build(script: str, archive: str, build_dir: str, exe: str) -> str:
    """Build an engine with bench/SCRIPT from its trimmed archive (once per build_dir)."""
    path = os.path.join(build_dir, "build", "bin", exe)
    if not os.path.exists(path):
        subprocess.run(["bash", os.path.join(HERE, script), archive, build_dir], check=True)
    return path


def start_build(script: str, archive: str, build_dir: str, exe: str) -> subprocess.Popen:
    """build() in the background while the models are made."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import native_compare as n; "
                             "n.build(%r, %r, %r, %r)" % (HERE, script, archive, build_dir, exe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_build(proc: subprocess.Popen | None, name: str, build_dir: str, exe: str) -> str | None:
    if proc is None:
        return None
    log, _ = proc.communicate()
    if proc.returncode:
        print(f"{name} build failed; comparing without it:\n" + log[-3000:], file=sys.stderr)
        return None
    return os.path.join(build_dir, "build", "bin", exe)


def run_llama(exe: str, gguf: str, threads: list[int], ctx: int, reps: int) -> dict:
    """{threads: {"pp32": [ms...], "tg": [ms per token...]}} from llama-bench's JSON samples."""
    out: dict[int, dict] = {}
    for t in threads:
        r = reps if t >= 4 else max(2, reps // 2)  # the depth prefill costs seconds at 1-2 threads
        cmd = [exe, "-m", gguf, "-p", str(BLOCK), "-n", "16", "-d", str(ctx), "-t", str(t), "-r", str(r),
               "-o", "json", "-ngl", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise RuntimeError(f"llama-bench failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        res = {}
        for rec in json.loads(p.stdout):
            ns = rec.get("samples_ns") or [rec["avg_ns"]]
            if rec.get("n_prompt", 0) and not rec.get("n_gen", 0):
                res["pp32"] = [x / 1e6 for x in ns]
            elif rec.get("n_gen", 0):
                res["tg"] = [x / 1e6 / rec["n_gen"] for x in ns]
        out[t] = res
    return out


# ----------------------------------------------------------------------------- bitnet.cpp

BITNET_TYPES = ("i2_s", "tl2")


def run_depth(exe: str, gguf: str, threads: list[int], ctx: int, reps: int) -> dict:
    """{threads: {"pp32": [ms...], "tg": [ms per token...]}} from bench/llama_depth.cpp."""
    out: dict[int, dict] = {}
    for t in threads:
        r = reps if t >= 4 else max(2, reps // 2)
        cmd = [exe, gguf, "--threads", str(t), "--depth", str(ctx), "--batch", str(BLOCK), "--gen", "16",
               "--reps", str(r)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise RuntimeError(f"llama-depth failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        if not rec["finite"]:
            raise RuntimeError(f"llama-depth: non-finite logits from {gguf} at {t} threads")
        out[t] = {"pp32": rec["pp_ms"], "tg": rec["tg_ms"]}
    return out


def bitnet_logits_check(exe: str, ggufs: dict, threads: int, n_tokens: int = 8) -> dict:
    """Correlation of each model's logits with the TQ2_0 model's (same weights, same
    graph; only the activation quantization differs), mean over n_tokens positions."""
    import numpy as np

    toks = ",".join(str((i * 7919 + 13) % 997) for i in range(n_tokens))
    logits = {}
    for name, path in ggufs.items():
        p = subprocess.run([exe, path, "--tokens", toks, "--threads", str(threads)], capture_output=True,
                           text=True, timeout=900)
        if p.returncode:
            raise RuntimeError(f"llama-depth --tokens failed on {path}:\n{p.stderr[-2000:]}")
        logits[name] = np.array(json.loads(p.stdout.replace("-nan", "NaN").replace("nan", "NaN"))["logits"])
    ref = logits.pop("tq2_0")
    return {name: {"corr": float(np.mean([np.corrcoef(x[i], ref[i])[0, 1] for i in range(n_tokens)])),
                   "top1_agree": float(np.mean(x.argmax(1) == ref.argmax(1))), "finite": bool(np.isfinite(x).all())}
            for name, x in logits.items()}


def bitnet_ggufs(model: str, archive: str) -> dict:
    """{type: GGUF path} of the model in bitnet.cpp's I2_S and TL2 layouts (TL2 only where the
    archive's TL2 kernels cover the model's shapes)."""
    from gguf_export import read_tl2_config

    out = {}
    for w in BITNET_TYPES:
        path = os.path.splitext(model)[0] + f"-{w}-q8_0.gguf"
        if not os.path.exists(path):
            cmd = [sys.executable, os.path.join(HERE, "gguf_export.py"), model, path + ".tmp", "--weights", w,
                   "--output", "q8_0"] + (["--tl2-config", archive] if w == "tl2" else [])
            p = subprocess.run(cmd, capture_output=True, text=True, env=env_for(os.cpu_count() or 1))
            if p.returncode:
                print(f"bitnet.cpp {w}: no GGUF ({p.stderr.strip().splitlines()[-1]})", file=sys.stderr)
                continue
            os.replace(path + ".tmp", path)
        out[w] = path
    read_tl2_config(archive)  # a bad archive fails here, before any timing
    return out


# ----------------------------------------------------------------------------- main

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bitdlm .bin with an int8 lm_head (default: make the 2B synthetic one)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bitdlm-native"),
                    help="where the synthetic model, its GGUF and the llama.cpp build go")
    ap.add_argument("--llama-archive", default=os.path.join(HERE, "out", "llama-cpu.tar.gz"),
                    help="trimmed llama.cpp source (bench/llama_trim.py); '' skips llama.cpp")
    ap.add_argument("--bitnet-archive", default="",
                    help="trimmed bitnet.cpp source (bench/bitnet_trim.py); '' (default) skips bitnet.cpp")
    ap.add_argument("--threads", default="1,2,4,8,16", help="thread counts (comma list)")
    ap.add_argument("--isas", default="", help="ISAs timed at the largest thread count (default: all supported)")
    ap.add_argument("--ctx", type=int, default=512, help="cached positions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels-json", default=None, help="ceilings from a bench/kernels.py run (else measured here)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",") if x]
    os.makedirs(a.workdir, exist_ok=True)
    t_start = time.time()

    llama_dir, bitnet_dir = os.path.join(a.workdir, "llama"), os.path.join(a.workdir, "bitnet")
    builder = start_build("build_llama_bench.sh", a.llama_archive, llama_dir, "llama-bench") if a.llama_archive else None
    bn_builder = (start_build("build_bitnet_bench.sh", a.bitnet_archive, bitnet_dir, "llama-depth")
                  if a.bitnet_archive else None)
    model = a.model
    if model is None:
        model = os.path.join(a.workdir, "synth2b-i8.bin")
        if not os.path.exists(model):
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_model.py"), model, "--lm-head", "i8"],
                           check=True, env=env_for(os.cpu_count() or 1))
    gguf = os.path.splitext(model)[0] + "-tq2_0-q8_0.gguf"
    if (a.llama_archive or a.bitnet_archive) and not os.path.exists(gguf):
        subprocess.run([sys.executable, os.path.join(HERE, "gguf_export.py"), model, gguf, "--weights", "tq2_0",
                        "--output", "q8_0"], check=True, env=env_for(os.cpu_count() or 1))
    bn_ggufs = bitnet_ggufs(model, a.bitnet_archive) if a.bitnet_archive else {}
    llama_exe = finish_build(builder, "llama-bench", llama_dir, "llama-bench")
    bitnet_exe = finish_build(bn_builder, "bitnet.cpp", bitnet_dir, "llama-depth")
    bn_check = {}
    if bitnet_exe and bn_ggufs:
        bn_check = bitnet_logits_check(bitnet_exe, {"tq2_0": gguf, **bn_ggufs}, max(threads))
        print("bitnet.cpp logits vs its TQ2_0 run of the same weights:", json.dumps(bn_check), flush=True)

    # ceilings
    ceilings = {}
    kj = a.kernels_json
    if kj is None:
        kj = os.path.join(a.workdir, "kernels.json")
        p = subprocess.run([sys.executable, os.path.join(HERE, "kernels.py"), "--ceilings-only",
                            "--threads", f"1,{max(threads)}", "--json", kj],
                           env=env_for(max(threads)), capture_output=True, text=True)
        if p.returncode:
            print("bench/kernels.py --ceilings-only failed:\n" + p.stderr[-1500:], file=sys.stderr)
            kj = None
    if kj and os.path.exists(kj):
        with open(kj) as f:
            ceilings = json.load(f).get("ceilings", {})

    supported = json.loads(subprocess.run(
        [sys.executable, "-c", "import json; from bitdlm import _core; print(json.dumps(_core.supported_isas()))"],
        env=env_for(1), capture_output=True, text=True, check=True).stdout)
    isas = [x for x in a.isas.split(",") if x] or [i for i in supported if i != "scalar"]

    results = {"bitdlm": {}, "bitdlm_isa": {}, "llama.cpp": {}, **{"bitnet.cpp " + w: {} for w in bn_ggufs}}
    tmax = max(threads)

    def partial(engine: str):
        """What is timed so far, in the JSON and the log: a run cut by its caller's time limit keeps it."""
        if engine != "bitdlm":  # llama.cpp, bitnet.cpp ...: pp32 / tg
            for t, v in results[engine].items():
                print(f"{engine} {t:>3} threads: pp32 {med(v.get('pp32', [])):8.2f}  tg {med(v.get('tg', [])):7.2f} ms",
                      flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"partial": True, "ctx": a.ctx, "threads": threads, "bitnet_logits_check": bn_check,
                           "raw": results}, f, indent=1)
    for t in threads:
        r = run_bitdlm(model, t, None, a.ctx, a.reps)
        results["bitdlm"][t] = r
        print(f"bitdlm {r['isa']:>10} {t:>3} threads: decode {med(r['decode']):7.2f}  subblock "
              f"{med(r['subblock']):7.2f}  block {med(r['block']):7.2f} ms", flush=True)
    for isa in isas:
        r = run_bitdlm(model, tmax, isa, a.ctx, a.reps)
        results["bitdlm_isa"][isa] = r
        print(f"bitdlm {isa:>10} {tmax:>3} threads: decode {med(r['decode']):7.2f}  subblock "
              f"{med(r['subblock']):7.2f}  block {med(r['block']):7.2f} ms", flush=True)
    partial("bitdlm")
    if llama_exe:
        results["llama.cpp"] = run_llama(llama_exe, gguf, threads, a.ctx, a.reps)
        partial("llama.cpp")
    if bitnet_exe:
        for w, path in bn_ggufs.items():
            results["bitnet.cpp " + w] = run_depth(bitnet_exe, path, threads, a.ctx, a.reps)
            partial("bitnet.cpp " + w)

    # summary
    rows = []
    b1 = results["bitdlm"][min(threads)]
    for t in threads:
        r = results["bitdlm"][t]
        d, s, b = med(r["decode"]), med(r["subblock"]), med(r["block"])
        row = {"threads": t, "isa": r["isa"], "decode_ms": d, "subblock_ms": s, "block_ms": b,
               "break_even_subblock": s / d, "break_even_block": b / d,
               "block_parallel_eff": med(b1["block"]) * min(threads) / (b * t)}
        for engine, key in [("llama.cpp", "llama")] + [("bitnet.cpp " + w, "bitnet_" + w) for w in bn_ggufs]:
            ll = results[engine].get(t, {})
            if ll:
                row.update({f"{key}_pp32_ms": med(ll.get("pp32", [])), f"{key}_tg_ms": med(ll.get("tg", []))})
                row.update({f"vs_{key}_block": row[f"{key}_pp32_ms"] / b, f"vs_{key}_decode": row[f"{key}_tg_ms"] / d})
        rows.append(row)
    isa_rows = [{"isa": k, "decode_ms": med(v["decode"]), "subblock_ms": med(v["subblock"]),
                 "block_ms": med(v["block"])} for k, v in results["bitdlm_isa"].items()]

    hdr = (f"{'thr':>4} {'isa':>10} {'decode':>8} {'sub8':>8} {'block32':>8} {'BE8':>5} {'BE32':>5} "
           f"{'eff32':>6} {'ll.pp32':>8} {'ll.tg':>8} {'x pp32':>7} {'x tg':>6}")
    print("\nms per forward (medians), CTX =", a.ctx)
    print(hdr)
    for r in rows:
        print(f"{r['threads']:>4} {r['isa']:>10} {r['decode_ms']:8.2f} {r['subblock_ms']:8.2f} {r['block_ms']:8.2f} "
              f"{r['break_even_subblock']:5.2f} {r['break_even_block']:5.2f} {r['block_parallel_eff']:6.0%} "
              f"{r.get('llama_pp32_ms', float('nan')):8.2f} {r.get('llama_tg_ms', float('nan')):8.2f} "
              f"{r.get('vs_llama_block', float('nan')):7.2f} {r.get('vs_llama_decode', float('nan')):6.2f}")
    if bn_ggufs:
        print("\nbitnet.cpp, same weights (pp32 / tg ms; x = its ms / bitdlm's block32 or decode ms):")
        print(f"{'thr':>4} " + " ".join(f"{w + ' ' + c:>12}" for w in bn_ggufs for c in ("pp32", "tg", "x pp32", "x tg")))
        keys = [k for w in bn_ggufs for k in (f"bitnet_{w}_pp32_ms", f"bitnet_{w}_tg_ms", f"vs_bitnet_{w}_block",
                                               f"vs_bitnet_{w}_decode")]
        for r in rows:
            print(f"{r['threads']:>4} " + " ".join(f"{r.get(k, float('nan')):12.2f}" for k in keys))
    print(f"\nper ISA at {tmax} threads:")
    for r in isa_rows:
        print(f"  {r['isa']:>10}: decode {r['decode_ms']:7.2f}  subblock {r['subblock_ms']:7.2f}  "
              f"block {r['block_ms']:7.2f} ms")
    if ceilings:
        print("\nceilings measured in this run:", json.dumps(ceilings))

    doc = {"machine": _machine(), "ctx": a.ctx, "reps": a.reps, "threads": threads, "rows": rows,
           "bitnet_logits_check": bn_check,
           "isa_rows": isa_rows, "ceilings": ceilings, "raw": results, "seconds": time.time() - t_start,
           "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    if a.plot:
        _plot(rows, isa_rows, a.plot, doc["machine"].get("cpu", ""))
    return 0


def _machine() -> dict:
    info = {"cpu": "", "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    try:
        info["loadavg"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def _plot(rows, isa_rows, path, cpu):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    th = [r["threads"] for r in rows]
    for key, label in (("decode_ms", "bitdlm decode"), ("subblock_ms", "bitdlm 8-token step"),
                       ("block_ms", "bitdlm 32-token step"), ("llama_tg_ms", "llama.cpp tg"),
                       ("llama_pp32_ms", "llama.cpp pp32")) + tuple(
            (f"bitnet_{w}_{c}_ms", f"bitnet.cpp {w} {c}") for w in BITNET_TYPES for c in ("tg", "pp32")):
        ys = [r.get(key) for r in rows]
        if all(y is not None for y in ys):
            ax[0].plot(th, ys, "o-" if "bitdlm" in label else "s--" if "llama" in label else "^:", label=label)
    ax[0].set_xscale("log", base=2)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("threads")
    ax[0].set_ylabel("ms per forward (median)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("bitdlm vs llama.cpp")
    names = [r["isa"] for r in isa_rows]
    x = range(len(names))
    for i, (key, label) in enumerate((("decode_ms", "decode"), ("subblock_ms", "8-token"), ("block_ms", "32-token"))):
        ax[1].bar([j + 0.27 * (i - 1) for j in x], [r[key] for r in isa_rows], width=0.27, label=label)
    ax[1].set_xticks(list(x), names)
    ax[1].set_ylabel("ms")
    ax[1].set_title(f"per ISA at {rows[-1]['threads']} threads")
    ax[1].legend(fontsize=8)
    fig.suptitle(cpu, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
