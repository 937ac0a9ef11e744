"""bitdlm side by side with llama.cpp (TQ2_0 / TQ1_0) and PyTorch on the same machine.

One run, same thread count, alternating repetitions (engine order reversed every
other repetition so drift hits everyone alike). Each engine lives in its own worker
process (own OpenMP runtime, OMP_NUM_THREADS set) and is asked for one timed
forward at a time:

- bitdlm through bitdlm.load(...).forward (select mode, top-1 at every output);
- llama.cpp through llama-cpp-python's C API (llama_decode with logits at every
  output position; the argmax is not timed) on the SAME weights exported to GGUF
  (bench/gguf_export.py: ternary TQ2_0, optionally TQ1_0; token_embd = output
  layer in F16, or Q8_0 against bitdlm's int8 lm_head);
- transformers BitNetForCausalLM with online (autobitlinear) quantization, fp32,
  on the same shapes but fewer layers (--torch-layers; the full 2B model in fp32
  needs ~9 GB and minutes per block), against bitdlm on the same reduced model.

Cases, each at 0 and ~512 cached positions (--ctx):
  decode   N=1  AR decoding (one token, written to the cache);
  subblock N=8  a sub-block-cache step (8 tokens against the block's cached K/V);
  block    N=32 a full-block diffusion step (32 tokens against the prefix).
From bitdlm's numbers it derives the CPU economics of block diffusion: the
break-even tokens per forward at which diffusion beats AR decoding.

    python bench/compare.py [--threads 2] [--reps 5] [--quick] [--tq1] [--torch-layers 4]
        [--workdir bench/out] [--json OUT.json] [--plot OUT.png] [--md OUT.md]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "python"))  # unless PYTHONPATH / an install has bitdlm
sys.path.insert(0, HERE)

from bitdlm.bench import (BLOCK, SUB_BLOCK, BitdlmRunner, Case, child_pythonpath,  # noqa: E402
                          machine_info, summarize)

KINDS = ("decode", "subblock", "block")


# ----------------------------------------------------------------------------- engines (worker side)


class LlamaRunner:
    """llama.cpp through llama-cpp-python's low-level API, one context per cached length.

    Sequence 0 holds the prefix [0, ctx) and one block [ctx, ctx+32); every step
    runs on sequence 1, which shares the cached cells it needs (seq_cp) and is
    trimmed back afterwards, so every repetition sees the same cache."""

    engine = "llama.cpp"

    def __init__(self, path: str, threads: int, seed: int = 0):
        import llama_cpp as L

        self.L = L
        self._silence_logs()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.threads = threads
        self.rng = np.random.default_rng(seed)
        self.ctxs: dict[int, object] = {}
        self.batch = L.llama_batch_init(512, 0, 2)

    def _silence_logs(self):
        L = self.L

        @L.llama_log_callback
        def _quiet(level, text, user_data):  # keep errors only
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode(errors="replace"))

        self._log_cb = _quiet  # keep a reference: ctypes callbacks must outlive their use
        L.llama_log_set(self._log_cb, None)

    def _decode(self, lctx, tokens, start: int, seq: int, all_logits: bool) -> float:
        b = self.batch
        n = len(tokens)
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if (all_logits or i == n - 1) else 0
        t0 = time.perf_counter()
        rc = self.L.llama_decode(lctx, b)
        ms = (time.perf_counter() - t0) * 1e3
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        return ms

    def _tokens(self, n):
        return self.rng.integers(0, self.vocab - 8, size=n)

    def prepare(self, ctx: int) -> None:
        if ctx in self.ctxs:
            return
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx = (ctx + 2 * BLOCK + 255) // 256 * 256
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = 2
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.no_perf = True
        lctx = L.llama_init_from_model(self.model, cp)
        if not lctx:
            raise RuntimeError("llama_init_from_model failed")
        total = ctx + BLOCK
        for s in range(0, total, 512):
            self._decode(lctx, self._tokens(min(512, total - s)), s, 0, False)
        self.ctxs[ctx] = lctx

    def run(self, case: Case) -> float:
        self.prepare(case.ctx)
        lctx = self.ctxs[case.ctx]
        mem = self.L.llama_get_memory(lctx)
        # llama.cpp wants each sequence's positions to continue where its cache
        # ends, so the sub-block step sees [0, ctx+8) and not the block's later
        # positions too (24 fewer cached positions than bitdlm's sub-block step)
        shared = case.ctx + SUB_BLOCK if case.kind == "subblock" else case.ctx
        if case.kind not in KINDS:
            raise ValueError(case.kind)
        self.L.llama_memory_seq_rm(mem, 1, -1, -1)
        if shared:
            self.L.llama_memory_seq_cp(mem, 0, 1, 0, shared)
        ms = self._decode(lctx, self._tokens(case.n), shared, 1, True)
        self.L.llama_memory_seq_rm(mem, 1, -1, -1)
        return ms

    def close(self):
        for lctx in self.ctxs.values():
            self.L.llama_free(lctx)
        self.L.llama_batch_free(self.batch)
        self.L.llama_model_free(self.model)


class TorchRunner:
    """transformers BitNetForCausalLM, fp32, online ternary quantization (the oracle
    recipe of /work/shared/reference.md), loaded with the weights of a bitdlm .bin
    (tests/test_bench.py checks that both compute the same logits)."""

    engine = "pytorch"

    def __init__(self, model_path: str, threads: int, seed: int = 0):
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
        import torch
        from transformers import BitNetConfig, BitNetForCausalLM
        from transformers.initialization import no_init_weights
        from transformers.integrations.bitnet import replace_with_bitnet_linear
        from transformers.utils.quantization_config import BitNetQuantConfig

        from bitdlm.format import ModelFile
        from bitdlm.packing import unpack_i2

        torch.set_num_threads(threads)
        self.torch = torch
        with ModelFile.open(model_path) as f:
            meta = f.meta
            cfg = BitNetConfig(
                vocab_size=meta["vocab_size"], hidden_size=meta["hidden_size"],
                intermediate_size=meta["intermediate_size"], num_hidden_layers=meta["num_hidden_layers"],
                num_attention_heads=meta["num_attention_heads"], num_key_value_heads=meta["num_key_value_heads"],
                head_dim=meta["head_dim"], max_position_embeddings=meta["max_position_embeddings"],
                rope_theta=meta["rope_theta"], rms_norm_eps=meta["rms_norm_eps"], tie_word_embeddings=True,
                hidden_act="relu2", attn_implementation="eager",
                bos_token_id=None, eos_token_id=None, pad_token_id=None,
            )
            with no_init_weights():  # every parameter is overwritten below
                model = BitNetForCausalLM(cfg).float().eval()
            sd = {}
            for name, t in f.tensors.items():
                if name.startswith("lm_head."):
                    continue  # tied: the reference uses the embedding in fp32
                a = f.array(name)
                if t.dtype == "i2_b128":
                    # master weights whose online quantization gives back these codes
                    # (codes / mean|codes| rounds to the codes) with effective weight
                    # codes * mean|W| = codes / s_w, as in bitdlm
                    codes = unpack_i2(a, t.shape[1]).astype(np.float32)
                    w = codes * np.float32(1.0 / (t.scale * max(np.abs(codes).mean(), 1e-6)))
                else:
                    w = a.astype(np.float32)
                sd[name] = torch.from_numpy(w)
        model = replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                                           quantization_config=BitNetQuantConfig(
                                               linear_class="autobitlinear", quantization_mode="online"))
        missing, _unexpected = model.load_state_dict(sd, assign=True, strict=False)
        if [m for m in missing if not m.startswith("lm_head")]:
            raise RuntimeError(f"PyTorch reference: weights missing from the .bin: {missing[:5]}")
        model.tie_weights()
        self.model = model
        self.vocab = meta["vocab_size"]
        self.rng = np.random.default_rng(seed)
        self.caches: dict[int, object] = {}

    def _forward(self, tokens, start, cache):
        torch = self.torch
        ids = torch.as_tensor(tokens, dtype=torch.long)[None]
        pos = torch.arange(start, start + len(tokens))[None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
            out.logits.float().softmax(-1).max(-1)  # the select epilogue (top-1 + confidence)
            return (time.perf_counter() - t0) * 1e3

    def _tokens(self, n):
        return self.rng.integers(0, self.vocab - 8, size=n)

    def prepare(self, ctx: int) -> None:
        if ctx in self.caches:
            return
        from transformers import DynamicCache

        cache = DynamicCache()
        if ctx + BLOCK:
            self._forward(self._tokens(ctx + BLOCK), 0, cache)
        self.caches[ctx] = cache

    @staticmethod
    def _truncate(cache, length: int) -> None:
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # transformers 5 only accepts "drop the last n"

    def run(self, case: Case) -> float:
        self.prepare(case.ctx)
        cache = self.caches[case.ctx]
        ctx = case.ctx
        # DynamicCache appends: drop what the step added (and, for decode/block,
        # the cached block) so that each case sees the intended context.
        if case.kind == "subblock":
            ms = self._forward(self._tokens(SUB_BLOCK), ctx + SUB_BLOCK, cache)
            self._truncate(cache, ctx + BLOCK)
            return ms
        saved = [(layer.keys[:, :, ctx:ctx + BLOCK].clone(), layer.values[:, :, ctx:ctx + BLOCK].clone())
                 for layer in cache.layers]
        self._truncate(cache, ctx)
        ms = self._forward(self._tokens(case.n), ctx, cache)
        self._truncate(cache, ctx)
        for layer, (k, v) in zip(cache.layers, saved):  # put the block back for the sub-block case
            layer.keys = self.torch.cat([layer.keys, k], dim=2)
            layer.values = self.torch.cat([layer.values, v], dim=2)
        return ms

    def close(self):
        self.caches.clear()


def _worker(argv) -> int:
    ap = argparse.ArgumentParser(prog="compare.py _worker")
    ap.add_argument("engine", choices=["bitdlm", "llama", "torch"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel; native logs -> stderr
    os.dup2(2, 1)
    t0 = time.perf_counter()
    if a.engine == "bitdlm":
        runner = BitdlmRunner(a.model, threads=a.threads, seed=a.seed)
    elif a.engine == "llama":
        runner = LlamaRunner(a.model, a.threads, a.seed)
    else:
        runner = TorchRunner(a.model, a.threads, a.seed)
    proto.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            if cmd["op"] == "prepare":
                t0 = time.perf_counter()
                runner.prepare(int(cmd["ctx"]))
                proto.write(json.dumps({"ok": True, "s": time.perf_counter() - t0}) + "\n")
            elif cmd["op"] == "run":
                ms = runner.run(Case(cmd["kind"], int(cmd["ctx"])))
                proto.write(json.dumps({"ok": True, "ms": ms}) + "\n")
            else:
                raise ValueError(f"unknown op {cmd['op']!r}")
        except Exception as e:  # report, keep serving: the parent decides
            proto.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
    runner.close()
    return 0


# ----------------------------------------------------------------------------- parent side


class Worker:
    def __init__(self, label: str, engine: str, model: str, threads: int, seed: int, log_dir: str):
        self.label = label
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TORCH_COMPILE_DISABLE="1",
                   PYTHONPATH=child_pythonpath())
        self.log_path = os.path.join(log_dir, f"worker-{label.replace(' ', '_').replace('/', '-')}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_worker", engine, "--model", model,
             "--threads", str(threads), "--seed", str(seed)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.info = self._read()

    def _read(self, timeout: float = 900.0) -> dict:
        # one request -> one line, so nothing is left in the reader's buffer and
        # select() on the pipe is a reliable "has it answered" test
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise TimeoutError(f"worker {self.label} gave no answer in {timeout:.0f} s (log: {self.log_path})")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"worker {self.label} died (exit {self.proc.returncode}); log tail:\n{tail}")
        rec = json.loads(line)
        if rec.get("ok") is False:
            raise RuntimeError(f"worker {self.label}: {rec['error']}")
        return rec

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_group(name: str, specs: list[tuple[str, str, str]], ctxs: list[int], args, bar) -> dict:
    """specs: (label, engine, model path). Alternating repetitions of every case."""
    workers = []
    load = [round(x, 1) for x in os.getloadavg()]  # other tenants' load: the noise of this group
    try:
        for label, engine, path in specs:
            bar.set_postfix_str(f"{name}: loading {label}")
            workers.append(Worker(label, engine, path, args.threads, args.seed, args.workdir))
        for w in workers:
            for ctx in ctxs:
                bar.set_postfix_str(f"{name}: {w.label} prefill {ctx}")
                w.ask(op="prepare", ctx=ctx)
        cases = [Case(k, c) for c in ctxs for k in KINDS]
        for w in workers:  # warm-up (page-in, first-touch, thread pools)
            for case in cases:
                w.ask(op="run", kind=case.kind, ctx=case.ctx)
        times = {w.label: {c.name: [] for c in cases} for w in workers}
        deadline = time.monotonic() + args.max_seconds
        for rep in range(args.reps):
            order = workers if rep % 2 == 0 else workers[::-1]
            for case in cases:
                for w in order:
                    bar.set_postfix_str(f"{name}: rep {rep + 1} {case.name} {w.label}")
                    times[w.label][case.name].append(w.ask(op="run", kind=case.kind, ctx=case.ctx)["ms"])
            bar.update(1)
            if time.monotonic() > deadline and rep + 1 < args.reps:
                bar.write(f"{name}: --max-seconds reached after {rep + 1} repetitions")
                bar.update(args.reps - rep - 1)
                break
        return {
            "loadavg_at_start": load,
            "engines": {w.label: {"model": os.path.basename(p), "load_s": w.info["load_s"]}
                        for w, (_l, _e, p) in zip(workers, specs)},
            "cases": {lab: {c: summarize(v) for c, v in per.items()} for lab, per in times.items()},
        }
    finally:
        for w in workers:
            w.close()


def ensure_model(path: str, lm_head: str, layers: int | None, seed: int, shape: str = "2b") -> str:
    if os.path.exists(path):
        return path
    cmd = [sys.executable, os.path.join(HERE, "make_synthetic_model.py"), path, "--lm-head", lm_head,
           "--seed", str(seed), "--shape", shape]
    if layers:
        cmd += ["--layers", str(layers)]
    print(f"generating {path} ...", flush=True)
    subprocess.run(cmd, check=True)
    return path


def ensure_gguf(bin_path: str, out: str, weights: str, output: str) -> str:
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(bin_path):
        return out
    from gguf_export import export_bin

    tmp = out + ".tmp"
    export_bin(bin_path, tmp, weights, output)
    os.replace(tmp, out)
    return out


def economics(cases: dict, ctxs: list[int]) -> dict:
    """Break-even tokens per forward k at which block diffusion beats AR decoding.

    Per step: a forward over N positions that finalizes k tokens beats AR when
    k / t_N > 1 / t_1, i.e. k > t_N / t_1.
    Per block of 32 with its overheads (one extra full-block forward commits the
    block's K/V): full-block mode needs (32/k + 1) t_32 < 32 t_1; sub-block-cache
    mode, one full-block forward per 8-token sub-block then 8-token steps:
    4 t_32 + (32/k - 4) t_8 + t_32 < 32 t_1."""
    out = {}
    for ctx in ctxs:
        t1 = cases[f"decode@{ctx}"]["median_ms"]
        t8 = cases[f"subblock@{ctx}"]["median_ms"]
        t32 = cases[f"block@{ctx}"]["median_ms"]
        full = 32 * t1 - t32
        sub = 32 * t1 - 5 * t32 + 4 * t8
        out[str(ctx)] = {
            "ms_per_step": {"N=1": t1, "N=8": t8, "N=32": t32},
            "break_even_per_step": {"N=8": t8 / t1, "N=32": t32 / t1},
            "break_even_per_block": {
                "full_block": 32 * t32 / full if full > 0 else None,
                "sub_block_cache": 32 * t8 / sub if sub > 0 else None,
            },
        }
    return out


def ratios(group: dict, base: str) -> dict:
    """peer median / bitdlm median for every case (> 1: bitdlm is faster)."""
    b = group["cases"][base]
    return {lab: {c: v["median_ms"] / b[c]["median_ms"] for c, v in per.items()}
            for lab, per in group["cases"].items() if lab != base}


def goal_ratios(doc: dict) -> dict:
    """bitdlm speedup over llama.cpp TQ2_0 on the issue's two goal cases, per group."""
    out = {}
    for gname, g in doc["groups"].items():
        for lab, per in g.get("ratios", {}).items():
            if "TQ2_0" not in lab:
                continue
            for case in sorted(per):
                kind, ctx = case.split("@")
                if kind in ("block", "decode"):
                    out[f"{lab} {_case_label(case)}"] = per[case]
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"Measured {m['time_utc']} on {m['cpu']} ({m['physical_cores']} cores, {', '.join(m['isa'])}), "
             f"{doc['threads']} threads, median of {doc['reps']} alternating repetitions, "
             f"load average at start {m['loadavg_at_start']}"
             + (" -- NOISY: shared machine" if doc.get("noisy") else "") + ".", ""]
    for gname, g in doc["groups"].items():
        labels = list(g["cases"])
        base = labels[0]
        load = f", load average {g['loadavg_at_start']}" if g.get("loadavg_at_start") else ""
        lines.append(f"**{gname}** (ms per forward; in brackets: {base} speedup = peer ms / {base} ms{load})")
        lines.append("")
        lines.append("| case | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---:|" * len(labels))
        for case in g["cases"][base]:
            cells = [f"{g['cases'][base][case]['median_ms']:.1f}"]
            for lab in labels[1:]:
                ms = g["cases"][lab][case]["median_ms"]
                cells.append(f"{ms:.1f} ({g['ratios'][lab][case]:.2f}x)")
            lines.append(f"| {_case_label(case)} | " + " | ".join(cells) + " |")
        lines.append("")
    goal = doc.get("goal")
    if goal:
        lines.append("**Goal** (issue 7: bitdlm >= 2.5x llama.cpp TQ2_0 on the 32-token block, >= 1.5x on "
                     "1-token decoding): " + "; ".join(
                         f"{k}: {v:.2f}x" for k, v in goal.items()))
        lines.append("")
    e = doc.get("economics")
    if e:
        lines.append(f"**Block diffusion economics** ({e['source']}): ms per forward and break-even "
                     "tokens per forward k (diffusion beats AR decoding when it finalizes more than k "
                     "tokens per forward; per block: including the commit forward and, for the sub-block "
                     "cache, one full-block forward per sub-block)")
        lines.append("")
        lines.append("| cached | AR N=1 ms | sub-block N=8 ms | full block N=32 ms | k (N=8 step) | k (N=32 step) "
                     "| k per block, full | k per block, sub-block cache |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for ctx, v in e["by_ctx"].items():
            s, b, pb = v["ms_per_step"], v["break_even_per_step"], v["break_even_per_block"]
            fmt = lambda x: "never" if x is None or x > 32 else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {ctx} | {s['N=1']:.1f} | {s['N=8']:.1f} | {s['N=32']:.1f} | {b['N=8']:.2f} | "
                         f"{b['N=32']:.2f} | {fmt(pb['full_block'])} | {fmt(pb['sub_block_cache'])} |")
        lines.append("")
    return "\n".join(lines)


def _case_label(name: str) -> str:
    kind, ctx = name.split("@")
    n = {"decode": "1-token decode", "subblock": "8-token step", "block": "32-token block"}[kind]
    return f"{n}, {ctx} cached"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in doc["groups"].values()]
    fig, axes = plt.subplots(1, len(groups) + (1 if doc.get("economics") else 0),
                             figsize=(5 * (len(groups) + 1), 4), squeeze=False)
    axes = axes[0]
    for ax, (gname, g) in zip(axes, doc["groups"].items()):
        labels = list(g["cases"])
        case_names = list(g["cases"][labels[0]])
        x = np.arange(len(case_names))
        w = 0.8 / len(labels)
        for i, lab in enumerate(labels):
            ax.bar(x + i * w, [g["cases"][lab][c]["median_ms"] for c in case_names], w, label=lab)
        ax.set_xticks(x + 0.4 - w / 2, [c.replace("@", "\n@") for c in case_names], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms per forward")
        ax.set_title(gname, fontsize=8)
        ax.legend(fontsize=7)
    e = doc.get("economics")
    if e:
        ax = axes[-1]
        k = np.linspace(1, 32, 200)
        for ctx, v in e["by_ctx"].items():
            s = v["ms_per_step"]
            line = ax.plot(k, k * 1e3 / s["N=32"], label=f"N=32 step, {ctx} cached")[0]
            ax.plot(k, k * 1e3 / s["N=8"], ls="--", color=line.get_color(), label=f"N=8 step, {ctx} cached")
            ax.axhline(1e3 / s["N=1"], ls=":", color=line.get_color(), label=f"AR N=1, {ctx} cached")
        ax.set_xlabel("tokens finalized per forward (k)")
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"block diffusion vs AR ({e['source']})", fontsize=8)
        ax.legend(fontsize=6)
    m = doc["machine"]
    fig.suptitle(f"{m['cpu']}, {doc['threads']} threads, {m['time_utc']}"
                 + (" (noisy, shared machine)" if doc.get("noisy") else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return _worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions (default 5)")
    ap.add_argument("--ctx", default="0,512", help="cached positions, comma list (default 0,512)")
    ap.add_argument("--quick", action="store_true", help="2 reps, ctx 0 only, no PyTorch, no TQ1_0")
    ap.add_argument("--tq1", action="store_true", help="also llama.cpp TQ1_0 (f16 output group)")
    ap.add_argument("--precision", default="f16,i8", help="output-layer groups to run: f16,i8")
    ap.add_argument("--torch-layers", type=int, default=1,
                    help="layers of the PyTorch comparison model (0 = skip PyTorch; default 1: online "
                         "quantization re-quantizes every weight in every forward, seconds per layer)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--layers", type=int, default=None, help="layers of the main model (default: 30, the 2B shape)")
    ap.add_argument("--shape", choices=["2b", "tiny"], default="2b", help="tiny: for testing this script")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=os.path.join(HERE, "out"), help="models, GGUFs and logs (default bench/out)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="per group: stop repeating after this")
    ap.add_argument("--noisy", action="store_true", help="label the results as measured on a busy machine")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.ctx, a.torch_layers, a.tq1 = min(a.reps, 2), "0", 0, False
    ctxs = sorted({int(x) for x in a.ctx.split(",")})
    precisions = [p for p in a.precision.split(",") if p]
    if any(p not in ("f16", "i8") for p in precisions) or not precisions:
        ap.error("--precision takes f16 and/or i8")
    if a.threads < 1 or a.reps < 1 or min(ctxs) < 0:
        ap.error("--threads >= 1, --reps >= 1, --ctx >= 0")
    os.makedirs(a.workdir, exist_ok=True)
    from tqdm import tqdm

    if not a.no_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            ap.error("llama.cpp comparison needs `pip install llama-cpp-python` (or pass --no-llama)")

    base_tag = "synth2b" if a.shape == "2b" else "synthtiny"
    tag = f"{base_tag}-L{a.layers}" if a.layers else base_tag
    groups_spec = {}
    for prec in precisions:
        bin_path = ensure_model(os.path.join(a.workdir, f"{tag}-{prec}.bin"), prec, a.layers, a.seed, a.shape)
        specs = [(f"bitdlm {prec}", "bitdlm", bin_path)]
        if not a.no_llama:
            out = "f16" if prec == "f16" else "q8_0"
            specs.append((f"llama.cpp TQ2_0/{out.upper()}", "llama",
                           ensure_gguf(bin_path, os.path.join(a.workdir, f"{tag}-tq2_0-{out}.gguf"), "tq2_0", out)))
            if a.tq1 and prec == "f16":
                specs.append(("llama.cpp TQ1_0/F16", "llama",
                              ensure_gguf(bin_path, os.path.join(a.workdir, f"{tag}-tq1_0-f16.gguf"), "tq1_0", "f16")))
        groups_spec[f"{tag}, output layer {prec}"] = specs
    if a.torch_layers:
        small = ensure_model(os.path.join(a.workdir, f"{base_tag}-L{a.torch_layers}-f16.bin"), "f16",
                             a.torch_layers, a.seed, a.shape)
        groups_spec[f"{base_tag} with {a.torch_layers} layer{'s' if a.torch_layers > 1 else ''} "
                    "(PyTorch: fp32 output layer)"] = [
            ("bitdlm f16", "bitdlm", small), ("pytorch fp32 online-quant", "torch", small)]

    doc = {"benchmark": "bench/compare.py", "machine": machine_info(), "threads": a.threads, "reps": a.reps,
           "ctx": ctxs, "noisy": a.noisy, "groups": {}}
    with tqdm(total=a.reps * len(groups_spec), desc="compare", unit="rep") as bar:
        for gname, specs in groups_spec.items():
            g = run_group(gname, specs, ctxs, a, bar)
            g["ratios"] = ratios(g, specs[0][0])
            doc["groups"][gname] = g
    first = next(iter(doc["groups"].values()))
    base = next(iter(first["cases"]))
    doc["economics"] = {"source": f"{base}, {next(iter(doc['groups']))}",
                        "by_ctx": economics(first["cases"][base], ctxs)}
    doc["goal"] = goal_ratios(doc)
    md = markdown(doc)
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {a.json}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
        print(f"wrote {a.md}")
    if a.plot:
        plot(doc, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
