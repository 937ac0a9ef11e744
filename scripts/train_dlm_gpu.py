#!/usr/bin/env python3
"""The GPU trainer of the default model: train_tiny_dlm.py's model, objective,
data and checkpoint format, made fast and resumable (issue 26).

What differs from scripts/train_tiny_dlm.py (which stays as the reference):
- the model is scripts/fast_bitnet.py (the same function as transformers'
  BitNet with online AutoBitLinear; same parameter names), the whole
  forward + loss is `torch.compile`d (quantizers fused by inductor, q/k/v and
  gate/up as one matmul each);
- attention through FlexAttention with the block-diffusion BlockMask (only the
  ~25% of 128x128 tiles the mask touches are computed) instead of SDPA over a
  dense boolean mask;
- the loss has static shapes (fast_bitnet.fixed_shape_loss: the same targets
  and mean as diffusion_loss, no boolean gathers), so one graph serves every
  step; no host sync inside a step: a non-finite step is skipped on the GPU
  (fused AdamW's found_inf) and counted when the log is read (every
  --log-every steps);
- the batches are windows of the packed token stream (documents back to back,
  separated by <|endoftext|>: no padding), gathered on the GPU;
- resumable: the full state (f32 weights, AdamW moments, step, data RNG, log)
  is saved to --state-dir every --save-every-min minutes and when the leg's
  time (--leg-minutes) is up; `--resume DIR` continues from DIR/state.pt, or,
  when only the portable checkpoint came back (bf16 weights +
  trainer_state.json, what scripts/train_gpu.sh returns), from the weights
  with a fresh optimizer and --rewarmup steps of warmup. The cosine schedule
  is fixed by --steps, so legs do not change it.
Evaluation is the reference code (train_tiny_dlm.evaluate, SDPA, eager) on
the same fixed held-out batches, so figures compare with the old trainer's.

    python3 scripts/train_dlm_gpu.py --data build-train/data --device cuda --amp bf16 \\
        --steps 40000 --leg-minutes 8 --out build-train/gpu/ckpt --state-dir build-train/gpu/state
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import base64
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_bitnet as fb  # noqa: E402
import train_tiny_dlm as base  # noqa: E402


def parse_args(argv=None):
    p = base.build_parser(__doc__)
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the training step (auto: on for cuda)")
    p.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs", "max-autotune",
                                             "reduce-overhead"], default="default",
                   help="torch.compile's mode (the trainer bench's part M compares them: autotuned "
                        "matmul / Triton configs, CUDA graphs against the per-kernel launch cost)")
    p.add_argument("--attention", choices=["auto", "flex", "sdpa"], default="auto",
                   help="flex: FlexAttention BlockMask (auto on cuda); sdpa: dense boolean mask")
    p.add_argument("--state-dir", default=None, help="full resumable state (default OUT/state)")
    p.add_argument("--resume", default=None,
                   help="a --state-dir (state.pt) or a portable checkpoint folder (weights only)")
    p.add_argument("--init-bin", default=None,
                   help="start from the weights of a bitdlm .bin of the same shape and tokenizer (the shipped "
                        "model, say): the function it computes, with a fresh optimizer and schedule")
    p.add_argument("--final-leg", action="store_true",
                   help="when --leg-minutes / --leg-steps is up before --steps, end the training there "
                        "(evaluate, write DONE) instead of saving for another leg")
    p.add_argument("--rewarmup", type=int, default=100,
                   help="warmup steps after a weights-only resume (fresh AdamW moments)")
    p.add_argument("--leg-minutes", type=float, default=None,
                   help="stop after this many minutes of this process, saving the resumable state")
    p.add_argument("--leg-steps", type=int, default=None,
                   help="stop after this many steps of this process (like --leg-minutes)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--compare-every", type=int, default=0,
                   help="debug: also evaluate the reference loss (eager, dense mask) on the training "
                        "batch every N steps and log both")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after warm-up, profile N steps (torch.profiler: the ops by self device / CPU "
                        "time, and the host's batch sampling time), print the tables and exit")
    args = p.parse_args(argv)
    args = base.check_args(p, args)
    unsupported = [f for f, v in (("--init-from", args.init_from), ("--time-budget-min", args.time_budget_min),
                                  ("--no-save", args.no_save), ("--bin", args.bin)) if v]
    if unsupported:
        p.error(f"{', '.join(unsupported)}: not in this trainer (use --resume, --leg-minutes, "
                f"then `bitdlm convert`)")
    if args.init_bin and args.resume:
        p.error("--init-bin starts a run; --resume continues one: give one of them")
    args.state_dir = args.state_dir or str(Path(args.out) / "state")
    return args


def weights_from_bin(path, vocab: dict) -> tuple[dict, dict]:
    """fp32 weights (numpy, the FastBitNet / transformers names) of a bitdlm .bin that compute what
    the .bin computes, and its header. A ternary matrix stored as codes c and scale s (effective
    weight c / s) becomes the latent w = c / (s * f), f = the share of non-zero codes: absmean
    quantization of w gives back scale 1 / mean|w| = s and codes round(c / f) clipped = c (f <= 1),
    so the trainer's first forward is the .bin's. `vocab` must be the .bin's tokenizer's."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    from bitdlm.format.reader import ModelFile
    from bitdlm.format.spec import embedding_table
    from bitdlm.packing import unpack_i2

    out = {}
    with ModelFile.open(path, verify=True) as mf:
        meta = dict(mf.meta)
        tok = json.loads(meta["tokenizer_json"])
        if tok["model"]["vocab"] != vocab:
            raise SystemExit(f"--init-bin {path}: its tokenizer is not the corpus's (prepare the data with it)")
        emb_w, emb_s = embedding_table(meta)
        if emb_s is not None:  # int8 rows x per-row scales (--embedding i8), as the forward reads them
            out["model.embed_tokens.weight"] = (np.asarray(mf.array(emb_w), np.float32)
                                                * np.asarray(mf.array(emb_s), np.float32)[:, None])
        for name, t in mf.tensors.items():
            if name in (emb_w, emb_s) and emb_s is not None:
                continue
            if meta["tie_word_embeddings"] and name.startswith("lm_head."):
                continue  # a tied model's int8 lm_head is a quantized copy of the embedding
            a = mf.array(name)
            if t.dtype == "i2_b128":
                codes = unpack_i2(a, t.shape[1]).astype(np.float32)
                frac = max(float(np.count_nonzero(codes)) / codes.size, 1e-6)
                out[name] = codes / np.float32(t.scale * frac)
            elif t.dtype in ("f16", "f32", "bf16"):
                out[name] = np.array(a, dtype=np.float32).reshape(t.shape)  # a copy: the map closes
            else:
                raise SystemExit(f"--init-bin {path}: tensor {name} is {t.dtype}; an f16 / f32 .bin of "
                                 f"ternary weights is needed (`bitdlm convert` without int8 heads)")
    return out, meta


def _gen_state_b64(gen) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def _set_gen_state(gen, b64: str):
    import numpy as np
    import torch

    gen.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy()))


def save_state(path: Path, model, opt, step: int, gen, log: dict):
    """Everything to continue exactly: written to a temporary name, then renamed."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "gen": _gen_state_b64(gen), "log": log}, tmp)
    os.replace(tmp, path / "state.pt")


def save_portable(out: Path, model, tok, args, step: int, gen, log: dict):
    """The HF checkpoint (bf16 weights, `bitdlm convert` takes it) plus
    trainer_state.json: a weights-only restart point small enough to come back."""
    base.save_checkpoint(model, tok, args, out, log)
    (out / "trainer_state.json").write_text(json.dumps(
        {"step": step, "gen": _gen_state_b64(gen), "steps": args.steps, "seed": args.seed}) + "\n")


def main(argv=None):
    args = parse_args(argv)
    import contextlib

    import torch

    t0 = time.time()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_compile = args.compile == "on" or (args.compile == "auto" and cuda)
    attention = args.attention if args.attention != "auto" else ("flex" if cuda else "sdpa")
    if use_compile or attention == "flex":
        import torch._dynamo

        torch._dynamo.config.disable = False  # train_tiny_dlm's TORCH_COMPILE_DISABLE=1 (for transformers)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    shift = not args.no_shift
    copies = 2 if args.complementary else 1

    def amp():
        if args.amp == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if not args.data:
        raise SystemExit("--data is required (scripts/prepare_code_data.py)")
    tok, (train_stream, train_starts), (held_stream, held_starts) = base.load_prepared(Path(args.data))
    eot, mask_id = tok.token_to_id(base.EOT), tok.token_to_id(base.MASK)
    print(f"corpus: {len(train_starts)} train docs ({train_stream.numel()} tokens), "
          f"{len(held_starts)} held-out docs ({held_stream.numel()} tokens), vocab {tok.get_vocab_size()}",
          flush=True)
    if min(held_stream.numel(), train_stream.numel()) <= args.seq_len + 1:
        raise SystemExit(f"corpus too small for --seq-len {args.seq_len}")

    model = fb.FastBitNet(base.make_config(args, tok.get_vocab_size(), eot)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}, amp {args.amp}, "
          f"attention {attention}, compile {use_compile}", flush=True)
    train_stream, held_stream = train_stream.to(device), held_stream.to(device)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    gen = torch.Generator().manual_seed(args.seed)
    log = {"args": vars(args), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "torch": torch.__version__, "params": n_params, "trainer": "train_dlm_gpu",
           "attention": attention, "compile": use_compile, "compile_mode": args.compile_mode,
           "corpus_tokens": {"train": train_stream.numel(), "heldout": held_stream.numel()},
           "steps": [], "loss": [], "lr": [], "time_s": [], "eval": [], "skipped_steps": 0,
           "legs": []}
    start_step, warm_from = 0, 0
    if args.resume:
        src = Path(args.resume)
        if (src / "state.pt").exists():
            st = torch.load(src / "state.pt", map_location=device, weights_only=False)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            start_step, log = st["step"], st["log"]
            _set_gen_state(gen, st["gen"])
            print(f"resumed from {src}/state.pt at step {start_step}", flush=True)
        elif (src / "trainer_state.json").exists():
            from safetensors.torch import load_file

            ts = json.loads((src / "trainer_state.json").read_text())
            state = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}
            model.load_state_dict(state)
            start_step = warm_from = ts["step"]
            _set_gen_state(gen, ts["gen"])
            old = src / "train_log.json"
            if old.exists():
                log = json.loads(old.read_text())
            log.setdefault("weights_only_resumes", []).append(start_step)
            print(f"resumed weights only from {src} at step {start_step} (fresh AdamW, "
                  f"{args.rewarmup} warmup steps)", flush=True)
        else:
            raise SystemExit(f"--resume {src}: neither state.pt nor trainer_state.json there")
    if args.init_bin:
        arrays, meta = weights_from_bin(args.init_bin, json.loads(tok.to_str())["model"]["vocab"])
        want = model.state_dict()
        missing = sorted(set(want) - set(arrays))
        extra = sorted(set(arrays) - set(want))
        if missing or extra:
            raise SystemExit(f"--init-bin {args.init_bin}: not this shape (missing {missing[:4]}, "
                             f"unexpected {extra[:4]})")
        for k, v in want.items():
            if tuple(v.shape) != arrays[k].shape:
                raise SystemExit(f"--init-bin {args.init_bin}: {k} is {arrays[k].shape}, the model's {tuple(v.shape)}")
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        prior = (meta.get("source") or {}).get("trained_tokens")
        log["init_bin"] = {"path": str(args.init_bin), "source": meta.get("source"), "trained_tokens": prior}
        print(f"initialised from {args.init_bin} (its function; fresh AdamW and schedule)", flush=True)
    if start_step >= args.steps:
        raise SystemExit(f"already at step {start_step} of --steps {args.steps}")
    log.setdefault("legs", []).append({"start_step": start_step, "t_start": time.time()})

    # fixed held-out batches: the reference evaluation, drawn exactly as train_tiny_dlm draws them
    egen = torch.Generator().manual_seed(args.seed + 1)
    eval_bs = args.micro_batch or args.batch
    eval_batches = []
    for _ in range(args.eval_batches):
        x = base.sample_batch(held_stream, held_starts, eval_bs, args.seq_len, egen)
        eval_batches.append((x, base.make_masks(eval_bs, args.seq_len, args.block_size, shift, False,
                                                egen).to(device)))
    eval_mask = base.block_diffusion_mask(args.seq_len, args.block_size, 1, device)

    if attention == "flex":
        attn_kw = {"block_mask": fb.make_block_mask(args.seq_len, args.block_size, copies, device)}
    else:
        attn_kw = {"attention_mask": base.block_diffusion_mask(args.seq_len, args.block_size, copies,
                                                               device)}

    def step_loss(x, masks):
        with amp():
            return fb.fixed_shape_loss(model, x, masks, args.block_size, shift, mask_id, **attn_kw)[0]

    loss_fn = torch.compile(step_loss, dynamic=False, mode=args.compile_mode) if use_compile else step_loss
    train_mask = base.block_diffusion_mask(args.seq_len, args.block_size, copies, device) \
        if args.compare_every else None

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        lr = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        if warm_from and step < warm_from + args.rewarmup:
            lr *= (step - warm_from + 1) / args.rewarmup
        return lr

    out = Path(args.out)
    state_dir = Path(args.state_dir)

    def save(step, tag):
        ts = time.time()
        save_state(state_dir, model, opt, step, gen, log)
        save_portable(out, model, tok, args, step, gen, log)
        base._write_log(log, args, out)
        print(f"saved ({tag}, step {step}) in {time.time() - ts:.1f}s", flush=True)

    micro = args.micro_batch or args.batch
    n_micro = args.batch // micro
    tokens_per_step = args.batch * args.seq_len
    params = list(model.parameters())
    found_inf = torch.zeros((), device=device)
    pending = []  # (step, loss, ok) tensors not yet read back
    leg_s = 60 * args.leg_minutes if args.leg_minutes else None
    last_save = time.time()
    t_meas = n_meas0 = None
    step = start_step
    model.train()
    prof = None
    sample_s = 0.0
    while step < args.steps:
        if args.profile and step == start_step + 5:  # compiled and warm: profile the next N steps
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                          ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.__enter__()
            t_prof, sample_s = time.time(), 0.0
        if prof is not None and step == start_step + 5 + args.profile:
            if cuda:
                torch.cuda.synchronize()
            wall = (time.time() - t_prof) / args.profile
            prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=30), flush=True)
            print(f"profile: {args.profile} steps, {1e3 * wall:.1f} ms per step wall, batch sampling on the "
                  f"host {1e3 * sample_s / args.profile:.1f} ms per step", flush=True)
            return 0
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.perf_counter()
        x = base.sample_batch(train_stream, train_starts, args.batch, args.seq_len, gen)
        masks = base.to_device(base.make_masks(args.batch, args.seq_len, args.block_size, shift, copies == 2,
                                               gen), device)
        sample_s += time.perf_counter() - ts
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i in range(n_micro):
            sl = slice(i * micro, (i + 1) * micro)
            loss = loss_fn(x[sl], masks[:, sl])
            (loss / n_micro).backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        total = total / n_micro
        ok = torch.isfinite(total) & torch.isfinite(norm)
        found_inf.copy_((~ok).float())
        opt.found_inf = found_inf  # fused AdamW skips the update (and its step count) when set
        opt.step()
        pending.append((step, lr, total, ok))
        step += 1
        if args.compare_every and step % args.compare_every == 0:
            with torch.no_grad():
                fast = step_loss(x[:micro], masks[:, :micro]).item()
                with amp():
                    ref = base.diffusion_loss(model, x[:micro], masks[:, :micro], args.block_size, shift,
                                              mask_id, train_mask)[0].item()
            log.setdefault("compare", []).append({"step": step, "fast": fast, "reference": ref})
            print(f"step {step}: compiled/flex loss {fast:.5f} vs reference {ref:.5f}", flush=True)
        if step - start_step == 3 and t_meas is None:
            if cuda:
                torch.cuda.synchronize()
            t_meas, n_meas0 = time.time(), step  # after compilation and warm-up
            print(f"compiled and warm after {time.time() - t0:.0f}s", flush=True)
        if step % args.log_every == 0 or step == args.steps or step - start_step <= 3:
            vals = torch.stack([torch.stack([t, o.float()]) for _, _, t, o in pending]).tolist()
            now = time.time()
            for (s, l, _, _), (v, good) in zip(pending, vals):
                if not good:
                    log["skipped_steps"] += 1
                    print(f"step {s + 1}: non-finite loss/grad norm: update skipped", flush=True)
                    continue
                log["steps"].append(s)
                log["loss"].append(v)
                log["lr"].append(l)
                log["time_s"].append(now - t0)
            bad_tail = 0
            for _, g in reversed(vals):
                if g:
                    break
                bad_tail += 1
            pending.clear()
            if bad_tail >= 20:
                log["failure"] = "20 non-finite steps in a row"
                save(step, "failure")
                raise SystemExit(f"step {step}: 20 non-finite steps in a row")
            tps = ""
            if t_meas is not None and step > n_meas0:
                rate = tokens_per_step * (step - n_meas0) / (now - t_meas)
                log["tokens_per_s"] = rate
                tps = f" {rate:,.0f} tokens/s"
            print(f"step {step}: loss {vals[-1][0]:.4f} lr {lr:.2e}{tps} ({now - t0:.0f}s)", flush=True)
        if step % args.eval_every == 0 and step < args.steps:
            el, acc = base.evaluate(model, eval_batches, args.block_size, shift, mask_id, eval_mask, amp)
            log["eval"].append({"step": step, "loss": el, "masked_acc": acc, "time_s": time.time() - t0})
            print(f"step {step}: held-out loss {el:.4f}  masked-token acc {acc:.4f}", flush=True)
            if t_meas is not None:  # keep the evaluation out of the throughput
                t_meas, n_meas0 = time.time(), step
        if args.save_every_min and time.time() - last_save > 60 * args.save_every_min and step < args.steps:
            save(step, "periodic")
            last_save = time.time()
        leg_over = (leg_s and time.time() - t0 > leg_s) or \
            (args.leg_steps and step - start_step >= args.leg_steps)
        if leg_over and step < args.steps and args.final_leg:
            print(f"final leg: the time is up at step {step} of {args.steps}: ending the training here",
                  flush=True)
            log["ended_early"] = {"step": step, "planned_steps": args.steps}
            break
        if leg_over and step < args.steps:
            log["legs"][-1].update(end_step=step, seconds=time.time() - t0)
            save(step, "end of leg")
            print(f"leg done at step {step} of {args.steps}: resume with --resume {state_dir}", flush=True)
            return 0
    log["legs"][-1].update(end_step=step, seconds=time.time() - t0)
    log["trained_steps"] = step
    log["trained_tokens"] = step * tokens_per_step
    save(step, "final")  # before the evaluation: a failure there must not lose the weights
    el, acc = base.evaluate(model, eval_batches, args.block_size, shift, mask_id, eval_mask, amp)
    log["eval"].append({"step": step, "loss": el, "masked_acc": acc, "time_s": time.time() - t0})
    log["final_eval"] = log["eval"][-1]
    print(f"final held-out loss {el:.4f}  masked-token acc {acc:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    base._write_log(log, args, out)
    (out / "DONE").write_text(f"{step}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
