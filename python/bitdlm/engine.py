"""Fast-dLLM v2 block-diffusion scheduler for many requests (reference.md section 3).

Every request walks through: chunked prefill of the prompt part that fills
whole blocks (KV written) -> blocks aligned to absolute positions, each decoded
sub-block by sub-block (left to right) with mask tokens -> one committing
forward per finished block (KV written; with token shift its last logits give
the first token of the next block). One `model.forward` call per `step()`
carries one item for every running request, whatever its phase -- one call per
block size when requests ask for different ones (`SamplingParams.block_length`:
the core's block-causal mask takes one block size per call), and a separate
call for the requests whose rule needs full logits (the credit decoder).

Per request: the unmasking rule (bitdlm.decoding: threshold | factor | credit)
and the cache strategy (none: every step recomputes the whole sequence from
position 0 without touching the KV cache; prefix: committed blocks cached;
dual: the sub-block cache). none and prefix decide from the same numbers (up to
rounding) and differ only in what each forward computes; dual attends to the
block's stale K/V.

An exception while planning, running or applying one request's step ends that
request alone (finish_reason "error", `error` set). When a batched forward
raises, its items are retried one by one so only the offending ones fail.

Block size 1 with shift is plain autoregressive decoding.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from . import decoding
from .sampling_params import SamplingParams

log = logging.getLogger("bitdlm.engine")

_PREFILL_CHUNK = 512  # prompt tokens per forward call, so long prompts do not stall other requests


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # newly final, contiguous
    text: str  # newly final text
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    num_prompt_tokens: int
    num_generated_tokens: int
    forwards: int  # forward calls this request took part in
    error: str | None = None  # why the engine dropped the request (finish_reason "error")


@dataclass
class EngineStats:
    forwards: int = 0  # model.forward calls
    items: int = 0  # sequences summed over calls
    tokens: int = 0  # generated tokens returned
    steps: int = 0
    step_seconds: float = 0.0
    last_step_seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


@dataclass
class _Seq:
    rid: str
    prompt: np.ndarray  # int32
    params: SamplingParams
    algo: decoding.Algorithm  # this request's unmasking rule (its own instance: rules may keep state)
    cache: str  # "none" | "prefix" | "dual"
    bs: int  # block size
    sbs: int  # small block size
    stop_ids: frozenset
    limit: int  # absolute end of generation (prompt + max_tokens, capped by the context)
    capacity: int
    rng: np.random.Generator
    detok: object | None
    seq_id: int = -1
    committed: int = 0  # cache positions [0, committed) hold final K/V
    prefilling: bool = True
    nfull: int = 0  # prompt tokens that fill whole blocks
    bstart: int = 0
    blk: np.ndarray | None = None
    masked: np.ndarray | None = None
    scratch: bool = False  # sub-block cache: the block's K/V were written by a full pass
    hist: list = field(default_factory=list)  # generated tokens before bstart
    emitted: int = 0  # generated tokens returned so far
    forwards: int = 0
    finished: bool = False
    reason: str | None = None
    end: int | None = None  # absolute end of the kept output once known
    text_held: str = ""  # text held back while a stop string may still complete
    text_seen: str = ""  # all detokenized text so far (for stop strings)
    t0: float = 0.0

    @property
    def P(self) -> int:
        return len(self.prompt)

    def token_at(self, pos: int) -> int:
        return self.hist[pos - self.P] if pos < self.bstart else int(self.blk[pos - self.bstart])


class Engine:
    """Continuous-batching block-diffusion engine over a `bitdlm.model.Model`."""

    def __init__(self, model, max_batch: int = 16, block_size: int | None = None, tokenizer=None,
                 prefill_chunk: int = _PREFILL_CHUNK):
        meta = model.meta
        diff = meta.get("diffusion") or {}
        self.model = model
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.block_size = int(block_size or diff.get("block_size") or 1)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.shift = bool(diff.get("shift_logits", True))
        self.mask_id = meta.get("mask_token_id")
        if self.block_size > 1 and self.mask_id is None:
            raise ValueError(f"block diffusion (block_size {self.block_size}) needs a mask token, "
                             "but this model has no mask_token_id; use block_size=1 (autoregressive)")
        if self.block_size == 1 and not self.shift:
            raise ValueError("block_size 1 needs a shifted model (logits at i-1 predict token i)")
        self.default_threshold = float(diff.get("threshold", 0.9))
        sbs = int(diff.get("small_block_size") or self.block_size)
        self.default_sbs = sbs if self.block_size % sbs == 0 else self.block_size
        self.eos_ids = frozenset(int(t) for t in (meta.get("eos_token_ids") or []))
        self.vocab = int(meta["vocab_size"])
        self.max_len = int(meta["max_position_embeddings"])
        self.banned = np.array([] if self.mask_id is None else [self.mask_id], dtype=np.int32)
        self.prefill_chunk = max(self.block_size, prefill_chunk // self.block_size * self.block_size)
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
        self.tokenizer = tokenizer
        self._waiting: deque[_Seq] = deque()
        self._running: OrderedDict[str, _Seq] = OrderedDict()
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (abort)
        self.stats = EngineStats()

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids, params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError on bad input; nothing is queued then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        params.validate()
        rid = str(request_id)
        if rid in self._running or any(s.rid == rid for s in self._waiting):
            raise ValueError(f"request id {rid!r} is already in use")
        try:
            prompt = np.asarray(list(prompt_ids), dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"prompt_ids must be a list of token ids: {e}") from None
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError("empty prompt")
        if prompt.min() < 0 or prompt.max() >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        if self.mask_id is not None and (prompt == self.mask_id).any():
            raise ValueError("the prompt contains the mask token")
        P = int(prompt.size)
        if P >= self.max_len:
            raise ValueError(f"prompt of {P} tokens leaves no room in the context of {self.max_len} tokens")
        bs = self.block_size if params.block_length is None else int(params.block_length)
        if bs > self.max_len:
            raise ValueError(f"block_length {bs} exceeds the context of {self.max_len} tokens")
        if bs > 1 and self.mask_id is None:
            raise ValueError(f"block_length {bs} needs a mask token, and this model has none; use 1 (autoregressive)")
        if bs == 1 and not self.shift:
            raise ValueError("block_length 1 needs a shifted model (logits at i-1 predict token i)")
        if params.small_block_size is not None:
            sbs = int(params.small_block_size)
        else:  # the engine's sub-block size where it fits this block size, else the whole block
            sbs = self.default_sbs if bs % self.default_sbs == 0 else bs
        if bs % sbs:
            raise ValueError(f"small_block_size {sbs} must divide the block size {bs}")
        if params.stop_list() and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        thr = self.default_threshold if params.threshold is None else float(params.threshold)
        algo = decoding.make(params.generation_algorithm, **{**params.algorithm_values(), "threshold": thr})
        limit = min(P + params.max_tokens, self.max_len)
        # the block holding the last wanted position is decoded (and, with the sub-block
        # cache, written as scratch) in full
        capacity = min((limit + bs - 1) // bs * bs, self.max_len)
        stop_ids = set(int(t) for t in (params.stop_token_ids or []))
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        detok = None
        if self.tokenizer is not None:
            detok = self.tokenizer.detokenizer(prompt.tolist(), skip_special_tokens=params.skip_special_tokens)
        seq = _Seq(rid=rid, prompt=prompt.astype(np.int32), params=params, algo=algo,
                   cache=params.cache_strategy(), bs=bs, sbs=sbs,
                   stop_ids=frozenset(stop_ids), limit=limit, capacity=capacity,
                   rng=np.random.default_rng(params.seed), detok=detok, nfull=P // bs * bs,
                   t0=time.perf_counter())
        self._waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Drop a request and free its cache at once; the next step() reports it."""
        rid = str(request_id)
        seq = self._running.pop(rid, None)
        if seq is None:
            for s in self._waiting:
                if s.rid == rid:
                    seq = s
                    self._waiting.remove(s)
                    break
        if seq is None:
            return
        self._release(seq)
        seq.finished, seq.reason = True, "abort"
        self._pending.append(self._output(seq, [], ""))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One scheduler step: one forward per (block size, output kind) advancing every running request."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        self._admit(outputs)
        groups: dict[tuple, list] = {}
        for seq in list(self._running.values()):
            try:
                item, plan = self._plan(seq)
                k = len(item[5])
                p = seq.params
                sampled = p.effective_temperature() > 0 and k
                u = seq.rng.random(k, dtype=np.float32) if sampled else np.zeros(k, np.float32)
            except Exception as e:
                self._fail(seq, outputs, "planning its step", e)
                continue
            mode = "logits" if (seq.algo.needs_logits and plan[0] in ("step", "full")) else "select"
            groups.setdefault((seq.bs, mode), []).append((seq, item, plan, u))
        for (bs, mode), members in groups.items():
            for (seq, item, plan, u), res in zip(members, self._forward_group(bs, mode, members, outputs)):
                if res is None:  # its forward failed; _forward_group has ended it
                    continue
                seq.forwards += 1
                try:
                    self._apply(seq, plan, res, u)
                    out = self._collect(seq)
                except Exception as e:
                    self._fail(seq, outputs, "applying its step", e)
                    continue
                if out is not None:
                    outputs.append(out)
                if seq.finished:
                    del self._running[seq.rid]
                    self._release(seq)
        if groups:
            dt = time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.step_seconds += dt
            self.stats.last_step_seconds = dt
        return outputs

    # ------------------------------------------------------------- internals
    def _call(self, bs: int, mode: str, members) -> list:
        """One model.forward over `members` -> per member: (tokens, confidences) or logits rows."""
        items = [m[1] for m in members]
        ks = [len(it[5]) for it in items]
        if mode == "logits":
            res = np.asarray(self.model.forward(items, bs, "logits")).reshape(sum(ks), self.vocab)
        else:
            temps = np.concatenate([np.full(k, m[0].params.effective_temperature(), np.float32)
                                    for k, m in zip(ks, members)])
            tops = np.concatenate([np.full(k, m[0].params.top_p, np.float32) for k, m in zip(ks, members)])
            unis = np.concatenate([m[3] for m in members])
            tok, conf = self.model.forward(items, bs, "select", temperature=temps, top_p=tops, uniforms=unis,
                                           banned=self.banned)
            res = (np.asarray(tok), np.asarray(conf))
        self.stats.forwards += 1
        self.stats.items += len(items)
        out, off = [], 0
        for k in ks:
            out.append(res[off:off + k] if mode == "logits" else (res[0][off:off + k], res[1][off:off + k]))
            off += k
        return out

    def _forward_group(self, bs: int, mode: str, members, outputs) -> list:
        """Results per member, None where that member's forward failed (it is then ended with an
        error). A failed batched call is retried item by item: a bad item fails alone, and a fault
        that is nobody's (every item fails alone too) fails only this step's requests. Retrying is
        safe: a writing item stores the same K/V again, the others change nothing."""
        try:
            return self._call(bs, mode, members)
        except Exception as e:
            if len(members) == 1:
                self._fail(members[0][0], outputs, "forward", e)
                return [None]
            log.warning("batched forward of %d requests failed (%s: %s); retrying them one by one",
                        len(members), type(e).__name__, e)
        results = []
        for m in members:
            try:
                results.append(self._call(bs, mode, [m])[0])
            except Exception as e:
                self._fail(m[0], outputs, "forward", e)
                results.append(None)
        return results

    def _fail(self, seq: _Seq, outputs: list, where: str, exc: BaseException) -> None:
        """End one request with an error output; the others go on."""
        log.warning("request %s failed while %s: %s: %s", seq.rid, where, type(exc).__name__, exc,
                    exc_info=not isinstance(exc, (ValueError, MemoryError)))
        self._running.pop(seq.rid, None)
        try:
            self._release(seq)
        except Exception:
            log.exception("freeing the cache of request %s failed", seq.rid)
            seq.seq_id = -1
        seq.finished, seq.reason = True, "error"
        outputs.append(self._output(seq, [], "", error=f"{where} failed: {type(exc).__name__}: {exc}"))

    def _admit(self, outputs: list) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            try:
                seq.seq_id = self.model.alloc_seq(seq.capacity)
            except MemoryError as e:
                if self._running:
                    return  # wait until a running request frees its cache
                self._waiting.popleft()
                seq.finished, seq.reason = True, "error"
                outputs.append(self._output(seq, [], "", error=f"out of KV cache memory: {e}"))
                continue
            except Exception as e:
                self._waiting.popleft()
                self._fail(seq, outputs, "allocating its cache", e)
                continue
            self._waiting.popleft()
            self._running[seq.rid] = seq
            # without a cache there is nothing to prefill, except the first token of a prompt
            # that ends on a block boundary (the last prompt logits predict it, with shift)
            skip = seq.cache == "none" and not (self.shift and seq.nfull == seq.P)
            if seq.nfull == 0 or skip:
                self._start_block(seq, seq.nfull, None)

    def _release(self, seq: _Seq) -> None:
        if seq.seq_id >= 0:
            self.model.free_seq(seq.seq_id)
            seq.seq_id = -1

    def _start_block(self, seq: _Seq, bstart: int, first_token: int | None) -> None:
        """Open the block at `bstart`: prompt remainder or the carried token, then masks."""
        seq.prefilling = False
        if seq.blk is not None:  # the closing block's generated part becomes history
            g0 = max(seq.bstart, seq.P) - seq.bstart
            seq.hist.extend(int(t) for t in seq.blk[g0:])
        bend = min(bstart + seq.bs, self.max_len)
        n = bend - bstart
        blk = np.full(n, -1 if self.mask_id is None else self.mask_id, np.int32)
        masked = np.ones(n, bool)
        known = seq.prompt[bstart:].tolist() if bstart < seq.P else []
        if first_token is not None:
            known.append(first_token)
        blk[:len(known)] = known
        masked[:len(known)] = False
        seq.bstart, seq.blk, seq.masked, seq.scratch = bstart, blk, masked, False
        seq.algo.reset()

    def _tokens(self, seq: _Seq) -> np.ndarray:
        """The whole sequence up to the end of the current block (cache "none" recomputes it)."""
        toks = np.concatenate([seq.prompt[:min(seq.P, seq.bstart)], np.asarray(seq.hist, np.int32), seq.blk])
        assert len(toks) == seq.bstart + len(seq.blk)
        return toks.astype(np.int32)

    def _plan(self, seq: _Seq):
        none = seq.cache == "none"
        sh = 1 if self.shift else 0
        if seq.prefilling:
            if none:  # nothing cached: one pass over the prompt for the first token's logits
                item = (seq.seq_id, seq.prompt[:seq.nfull].copy(), 0, 0, False,
                        np.asarray([seq.nfull - 1], np.int32))
                return item, ("prefill", seq.nfull)
            chunk = max(seq.bs, self.prefill_chunk // seq.bs * seq.bs)
            c0 = seq.committed
            c1 = min(seq.nfull, c0 + chunk)
            last = c1 == seq.nfull
            # with shift, the last logits of a prompt that ends on a block boundary give the next token
            out = [c1 - c0 - 1] if (last and self.shift and seq.nfull == seq.P) else []
            item = (seq.seq_id, seq.prompt[c0:c1], c0, c0, True, np.asarray(out, np.int32))
            return item, ("prefill", c1)
        n = len(seq.blk)
        if not seq.masked.any():
            if none and not self.shift:  # nothing to commit and no token to carry: open the next block
                self._start_block(seq, seq.bstart + n, None)
                return self._plan(seq)
            if none:  # the block's last logits give the next block's first token
                toks = self._tokens(seq)
                item = (seq.seq_id, toks, 0, 0, False, np.asarray([len(toks) - 1], np.int32))
                return item, ("commit", None)
            out = [n - 1] if self.shift else []
            item = (seq.seq_id, seq.blk.copy(), seq.bstart, seq.bstart, True, np.asarray(out, np.int32))
            return item, ("commit", None)
        first = int(np.argmax(seq.masked))
        s0 = first // seq.sbs * seq.sbs  # the left-most sub-block that still has masks
        s1 = min(s0 + seq.sbs, n)
        pos = np.nonzero(seq.masked[s0:s1])[0] + s0  # block indices to decide
        if sh:
            assert pos[0] >= 1, "block position 0 is never masked with token shift"
        if none:  # the whole sequence from position 0, block-causal, no cache read or written
            item = (seq.seq_id, self._tokens(seq), 0, 0, False, (seq.bstart + pos - sh).astype(np.int32))
            return item, ("step", pos)
        dual = seq.cache == "dual"
        if dual and seq.scratch and not seq.masked[s0]:
            # sub-block only, against the block's (stale) scratch K/V written by a full pass;
            # with shift, row j-1 of the sub-block predicts j (s0 itself is never masked here)
            out = pos - sh - s0
            item = (seq.seq_id, seq.blk[s0:s1].copy(), seq.bstart + s0, seq.bstart + n, False,
                    out.astype(np.int32))
            return item, ("step", pos)
        # full pass over the block; with the sub-block cache it leaves scratch K/V
        item = (seq.seq_id, seq.blk.copy(), seq.bstart, seq.bstart, dual, (pos - sh).astype(np.int32))
        return item, ("full" if dual else "step", pos)

    def _apply(self, seq: _Seq, plan, res, uniforms: np.ndarray) -> None:
        kind, arg = plan
        if kind in ("prefill", "commit"):
            tok = res[0]
            if kind == "prefill":
                seq.committed = arg
                if arg == seq.nfull:
                    self._start_block(seq, seq.nfull, int(tok[0]) if len(tok) else None)
                return
            end = seq.bstart + len(seq.blk)
            seq.committed = end
            self._start_block(seq, end, int(tok[0]) if len(tok) else None)
            return
        if kind == "full":
            seq.scratch = True
        pos = arg
        if seq.algo.needs_logits:
            lg = np.array(res, dtype=np.float32)
            lg[:, self.banned] = -np.inf
            p = seq.params
            tok, conf = seq.algo.fuse(pos, lg, p.effective_temperature(), p.top_p, uniforms)
        else:
            tok, conf = res
        sel = np.asarray(seq.algo.select(conf), dtype=np.int64)
        if sel.size == 0:
            raise RuntimeError(f"rule {seq.algo.name!r} unmasked nothing")
        seq.blk[pos[sel]] = tok[sel]
        seq.masked[pos[sel]] = False

    def _frontier(self, seq: _Seq) -> int:
        """Absolute end of the contiguous final prefix."""
        if seq.prefilling:
            return 0
        m = np.nonzero(seq.masked)[0]
        return seq.bstart + (int(m[0]) if m.size else len(seq.blk))

    def _collect(self, seq: _Seq) -> RequestOutput | None:
        """Finish checks and the newly final tokens / text of one request."""
        if seq.prefilling:
            return None
        front = min(self._frontier(seq), seq.limit)
        new_ids = []
        pos = seq.P + seq.emitted
        while pos < front:
            t = seq.token_at(pos)
            new_ids.append(t)
            pos += 1
            if t in seq.stop_ids:  # stop token, nothing masked before it: keep it, drop the rest
                seq.finished, seq.reason = True, "stop"
                break
        if not seq.finished and pos >= seq.limit:
            seq.finished, seq.reason = True, "length"
        text = ""
        if seq.detok is not None and new_ids:
            text, cut = self._detok(seq, new_ids)
            if cut is not None:
                new_ids = new_ids[:cut]
                seq.finished, seq.reason = True, "stop"
        elif seq.detok is not None and seq.finished:
            text = self._flush_text(seq)
        seq.emitted += len(new_ids)
        self.stats.tokens += len(new_ids)
        if not new_ids and not text and not seq.finished:
            return None
        return self._output(seq, new_ids, text)

    def _detok(self, seq: _Seq, new_ids: list[int]):
        """Incremental text; stop strings truncate. Returns (text to emit, token cut or None)."""
        stops = seq.params.stop_list()
        hold = max((len(s) for s in stops), default=1) - 1
        for i, t in enumerate(new_ids):
            delta = seq.detok.add(t)
            if not delta:
                continue
            seen0 = len(seq.text_seen)
            seq.text_seen += delta
            seq.text_held += delta
            if stops:
                lo = max(0, seen0 - hold)
                hits = [j for j in (seq.text_seen.find(s, lo) for s in stops) if j >= 0]
                if hits:
                    j = min(hits)
                    # drop the stop string and everything after it
                    drop = len(seq.text_seen) - j
                    seq.text_held = seq.text_held[:max(0, len(seq.text_held) - drop)]
                    out, seq.text_held = seq.text_held, ""
                    return out, i + 1
        if seq.finished:
            return self._flush_text(seq), None
        if hold and len(seq.text_held) > hold:
            out = seq.text_held[:-hold]
            seq.text_held = seq.text_held[-hold:]
            return out, None
        if hold:
            return "", None
        out, seq.text_held = seq.text_held, ""
        return out, None

    def _flush_text(self, seq: _Seq) -> str:
        tail = seq.detok.flush()
        seq.text_seen += tail
        out = seq.text_held + tail
        seq.text_held = ""
        stops = seq.params.stop_list()
        if tail and stops:  # a stop string could still complete inside the flushed tail
            hits = [j for j in (out.find(s) for s in stops) if j >= 0]
            if hits:
                out = out[:min(hits)]
        return out

    def _output(self, seq: _Seq, new_ids, text, error=None) -> RequestOutput:
        return RequestOutput(request_id=seq.rid, new_token_ids=list(new_ids), text=text,
                             finished=seq.finished, finish_reason=seq.reason if seq.finished else None,
                             num_prompt_tokens=seq.P, num_generated_tokens=seq.emitted,
                             forwards=seq.forwards, error=error)
