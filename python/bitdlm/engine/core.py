"""The Engine: the front of the engine package. It checks and admits requests
into the scheduler, runs one step (plan every running request, one forward per
group, apply, collect outputs), and keeps the statistics."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from .. import decoding
from ..sampling_params import MAX_SUB_BLOCKS, SamplingParamError, SamplingParams
from . import policy as _policy
from .group import GroupPlan
from .output_processor import OutputProcessor, RequestOutput, make_output, text_state
from .request_state import COMMIT, PREFILL, BlockConfig, RequestState
from .scheduler import Scheduled, Scheduler

log = logging.getLogger("bitdlm.engine")

_PREFILL_CHUNK = 512  # prompt tokens per forward call, so long prompts do not stall other requests


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


class Engine:
    """Continuous-batching block-diffusion engine over a `bitdlm.model.Model`."""

    def __init__(self, model, max_batch: int = 16, block_size: int | None = None, tokenizer=None,
                 prefill_chunk: int = _PREFILL_CHUNK, decode_policy: str = "fixed"):
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
        if tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
        self.tokenizer = tokenizer
        table = getattr(tokenizer, "_byte_table", None)
        if table is not None:  # the detokenizer's table, built now rather than at the first request
            table()
        self.stats = EngineStats()
        self.block_config = BlockConfig(shift=self.shift, mask_id=self.mask_id, max_len=self.max_len,
                                        prefill_chunk=max(self.block_size, prefill_chunk // self.block_size
                                                          * self.block_size), banned=self.banned,
                                        max_rows=self.max_batch)
        self.scheduler = Scheduler(model, self.max_batch, self.stats, self.vocab, self.banned)
        self.output_processor = OutputProcessor()
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (abort)
        self.decode_policy = _policy.check_policy(decode_policy)
        # adaptive on an AR engine has no choice to make: it decodes as fixed
        self.policy = (_policy.AdaptivePolicy() if decode_policy == "adaptive" and self.block_size > 1
                       else None)

    def calibrate(self) -> None:
        """Time the forwards the adaptive policy's cost model needs (policy.calibrate), once;
        call it on the thread that runs the forwards (the server's engine thread does, before
        serving; else the first request that needs a decision does)."""
        pol = self.policy
        if pol is None or pol.calibrated:
            return
        sbs = self.default_sbs
        pol.set_costs(*_policy.calibrate(self.model, max_batch=self.max_batch, block_size=self.block_size,
                                         sub_block=sbs, mask_id=self.mask_id, banned=self.banned))

    def reprice_idle(self) -> str | None:
        """On the forwards' thread while no request is queued: time again the mode whose price
        the adaptive policy holds stale (policy.stale_mode), one scratch request's forwards
        (tens of ms on the 2B shape). -> the mode re-timed, or None."""
        pol = self.policy
        if pol is None or self.has_unfinished():
            return None
        mode = pol.stale_mode()
        if mode is not None:
            pol.reprice(mode, _policy.time_mode(self.model, mode, block_size=self.block_size,
                                                sub_block=self.default_sbs, mask_id=self.mask_id,
                                                banned=self.banned))
        return mode

    def _assign_mode(self, params: SamplingParams, arriving: int = 0) -> tuple[SamplingParams, bool]:
        """Under the adaptive policy, the parameters of the mode it picks for a request that
        left the choice unset, against the requests it would run beside (running, then
        waiting, up to max_batch - 1, and `arriving` more known to come) -> (params, whether
        the policy chose)."""
        pol = self.policy
        if pol is None or not _policy.reassignable(params):
            return params, False
        try:
            self.calibrate()
        except Exception as e:  # (e.g. no KV memory for its scratch sequences now) tried again later
            log.warning("decode policy calibration failed (%s: %s): this request decodes as it asks",
                        type(e).__name__, e)
            return params, False
        a, d = self._mode_counts(self.max_batch - 1)
        arriving = min(max(0, int(arriving)), max(0, self.max_batch - 1 - a - d))
        mode = pol.decide(a, d, _policy.prior_tpf(params, self.block_size), arriving)
        return _policy.mode_params(params, mode), True

    def _mode_counts(self, limit: int) -> tuple[int, int]:
        """(AR, diffusion) requests among the first `limit` running, then waiting ones: those a
        request would run beside."""
        sched = self.scheduler
        a = d = 0
        for seq in itertools.islice(itertools.chain(sched.running.values(), sched.waiting.values()), limit):
            if seq.bs == 1:
                a += 1
            else:
                d += 1
        return a, d

    @property
    def prefill_chunk(self) -> int:
        return self.block_config.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:  # every request's plans read it at their next step
        self.block_config.prefill_chunk = int(n)

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids, params: SamplingParams | None = None, *,
                    arriving: int = 0) -> str:
        """Queue a request -> its decoding mode, "ar" (block size 1) or "diffusion" (chosen by
        the adaptive policy where the request left it unset). `arriving`: requests the caller
        will add right after this one (a batch of arrivals), which the policy counts as its
        neighbours. Raises ValueError on bad input; nothing is queued then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        params.validate()
        return self.add_checked(request_id, self.check_prompt(prompt_ids), params, arriving=arriving)

    def add_checked(self, request_id: str, prompt: np.ndarray, params: SamplingParams,
                    final_only: bool = False, arriving: int = 0) -> str:
        """add_request for a prompt that check_prompt returned and params that passed
        validate() (LLM.generate checks each of its params once, not once per prompt).
        final_only: no output until the request ends, then one with all its tokens and text."""
        rid = str(request_id)
        if self.scheduler.has(rid):
            raise ValueError(f"request id {rid!r} is already in use")
        P = int(prompt.size)
        params, assigned = self._assign_mode(params, arriving)
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
        if bs // sbs > MAX_SUB_BLOCKS:
            raise SamplingParamError("small_block_size", f"small_block_size {sbs} cuts the block of "
                                     f"{bs} into {bs // sbs} sub-blocks, more than {MAX_SUB_BLOCKS}: "
                                     f"use at least {-(-bs // MAX_SUB_BLOCKS)}")
        if params.stop_list() and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this engine has none")
        algo = self._algo(params, bs, sbs)
        limit = min(P + params.max_tokens, self.max_len)
        # the block holding the last wanted position is decoded (and, with the sub-block
        # cache, written as scratch) in full
        capacity = min((limit + bs - 1) // bs * bs, self.max_len)
        stop_ids = set(int(t) for t in (params.stop_token_ids or []))
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        seq = RequestState(rid=rid, prompt=prompt.astype(np.int32), params=params, algo=algo,
                           cache=params.cache_strategy(), bs=bs, sbs=sbs,
                           stop_ids=frozenset(stop_ids), limit=limit, capacity=capacity,
                           rng=(np.random.default_rng(params.seed) if params.effective_temperature() > 0
                                else None),  # (greedy never draws; a generator costs ~20 us)
                           cfg=self.block_config,
                           text=text_state(self.tokenizer, prompt.tolist(), params),
                           nfull=P // bs * bs, t0=time.perf_counter(), assigned=assigned, final_only=final_only)
        self.scheduler.add(seq)
        if assigned:
            self.policy.assigned[seq.mode] += 1
        return seq.mode

    def _algo(self, params: SamplingParams, bs: int, sbs: int) -> decoding.Algorithm:
        """A request's own unmasking rule (rules may keep state), set up for its block sizes."""
        thr = self.default_threshold if params.threshold is None else float(params.threshold)
        algo = decoding.make(params.generation_algorithm, **{**params.algorithm_values(), "threshold": thr})
        algo.configure(bs, sbs)
        return algo

    def check_prompt(self, prompt_ids) -> np.ndarray:
        """The prompt as int64 ids, or ValueError: not integers, empty, out of the
        vocabulary, holding the mask token, or leaving no room in the context."""
        try:
            prompt = np.asarray(list(prompt_ids), dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:  # 10**30 overflows int64
            raise ValueError(f"prompt_ids must be a list of token ids: {e}") from None
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError("empty prompt")
        if prompt.min() < 0 or prompt.max() >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        if self.mask_id is not None and (prompt == self.mask_id).any():
            raise ValueError("the prompt contains the mask token")
        if prompt.size >= self.max_len:
            raise ValueError(f"prompt of {prompt.size} tokens leaves no room in the context of "
                             f"{self.max_len} tokens")
        return prompt

    def abort(self, request_id: str) -> None:
        """Drop a request and free its cache at once; the next step() reports it."""
        seq = self.scheduler.remove(str(request_id))
        if seq is None:
            return
        seq.finish("abort")
        self._pending.append(make_output(seq))

    def drop_outputs(self, request_ids) -> None:
        """Forget the not yet reported outputs of `request_ids` (e.g. the abort outputs of
        requests whose caller has gone), so the engine is clean without a step."""
        rids = set(request_ids)
        self._pending = [o for o in self._pending if o.request_id not in rids]

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._pending)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One scheduler step: one forward per (block size, output kind) advancing every running request."""
        t0 = time.perf_counter()
        outputs, self._pending = self._pending, []
        sched = self.scheduler
        sched.admit(outputs)
        groups = sched.schedule(outputs)
        n_running = len(sched.running)  # (before the step's finished requests leave)
        if self.policy is not None:
            self._reprice_closing(groups)
        for key, batch in groups.items():
            tf = time.perf_counter()
            group_res, results = sched.forward(key, batch, outputs)
            priced = self.policy is not None and self._priced(key, batch)  # (before apply moves the requests on)
            if batch.group is not None:
                self._apply_group(batch.group, *group_res, outputs)
            self._apply_members(batch.members, results, outputs)
            if priced:  # the forward and its Python side: what the mode costs per step
                self.policy.observe_forward(_policy.mode_of(key.block_size), priced, time.perf_counter() - tf)
        if groups:
            if self.policy is not None:
                self.policy.observe_load(n_running)
            dt = time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.step_seconds += dt
            self.stats.last_step_seconds = dt
        return outputs

    def _reprice_closing(self, groups) -> None:
        """Adaptive policy: a diffusion request it assigned whose block closes in this step is
        priced again against the requests now beside it, and decodes AR from its next token on
        where that split is the better one (RequestState.close_block). Why: the first arrival
        of a burst finds an idle engine and takes diffusion; it need not make every AR step of
        the burst pay a diffusion forward for the rest of its life. Never the other way:
        diffusion blocks start at multiples of the block size, AR positions anywhere."""
        pol = self.policy
        if not pol.calibrated or not self.shift:
            return
        closing = []
        for batch in groups.values():
            if batch.group is not None:
                closing += batch.group.seqs[batch.group.n_decide:]
            closing += [m.seq for m in batch.members if m.plan.kind == COMMIT]
        closing = [s for s in closing if s.assigned and s.bs != 1 and s.to_ar is None]
        if not closing:
            return
        a, d = self._mode_counts(self.max_batch)  # (the closing ones among them)
        for seq in closing:
            if pol.decide(a, d - 1, _policy.prior_tpf(seq.params, seq.bs)) == _policy.AR:
                params = _policy.mode_params(seq.params, _policy.AR)
                seq.to_ar = (params, self._algo(params, 1, 1))
                pol.switched += 1
                a, d = a + 1, d - 1

    def _priced(self, key, batch) -> int:
        """The number of requests of a forward of the kind the adaptive policy prices
        (decoding steps of AR or of the engine's diffusion block size, select outputs, no
        prompt chunk in it), else 0: its time corrects that mode's cost curve."""
        if key.mode != "select" or key.block_size not in (1, self.block_size):
            return 0
        if any(m.plan.kind == PREFILL for m in batch.members):
            return 0
        return len(batch.members) + (len(batch.group.seqs) if batch.group is not None else 0)

    def _apply_members(self, members: list[Scheduled], results: list, outputs: list) -> None:
        """The per-request path's step: every member's rule (at once where it can), apply, output."""
        selected = self._select(members, results, outputs)
        for m, res, sel in zip(members, results, selected):
            if res is None:  # its forward (or its rule) failed; the request has been ended
                continue
            seq = m.seq
            seq.forwards += 1
            try:
                seq.apply(m.plan, res, m.uniforms, sel)
                out = self.output_processor.collect(seq)
            except Exception as e:
                self.scheduler.fail(seq, outputs, "applying its step", e)
                continue
            self._emit(seq, out, outputs)

    def _apply_group(self, group: GroupPlan, tok: np.ndarray, conf: np.ndarray, outputs: list) -> None:
        """The group path's step (engine/group.py): the deciding requests' rules and unmasking at
        once, then per request its carried token (committing ones) and output. Rules that raise
        leave the step to the per-request path, where a fault is pinned on its request."""
        try:
            sel = group.select(conf)
        except Exception as e:
            log.warning("the rules of a group of %d requests failed (%s: %s); applying them one by one",
                        len(group.seqs), type(e).__name__, e)
            ends = np.cumsum(group.num_out).tolist()
            self._apply_members([Scheduled(s, p, None) for s, p in group.plans()],
                                [(tok[b - k:b], conf[b - k:b]) for b, k in zip(ends, group.num_out)], outputs)
            return
        moved = group.unmask(sel, tok)
        carried = group.carried(tok)
        nd = group.n_decide
        try:
            done = group.commit_ar(carried)
        except Exception as e:  # (a fault before its writes: per request faults come back in `done`)
            log.warning("the AR commits of a group failed (%s: %s); committing them one by one",
                        type(e).__name__, e)
            done = None
        collect = self.output_processor.collect
        for i, seq in enumerate(group.seqs):
            seq.forwards += 1  # (before its output, which reports it)
            try:
                if i < nd:
                    if not moved[i]:  # nothing newly final: no output, and it goes on
                        continue
                else:
                    d = False if done is None else done[i - nd]
                    if d is False:
                        seq.close_block(carried[i - nd])
                    elif d is not True:
                        raise d
                out = collect(seq)
            except Exception as e:
                self.scheduler.fail(seq, outputs, "applying its step", e)
                continue
            if out is not None or seq.finished:  # (most steps of a final_only request: nothing to emit)
                self._emit(seq, out, outputs)

    def _emit(self, seq: RequestState, out: RequestOutput | None, outputs: list) -> None:
        """A request's output after its step, and its end."""
        if out is not None:
            self.stats.tokens += len(out.new_token_ids)
            outputs.append(out)
        if seq.finished:
            self.scheduler.finish(seq)
            if self.policy is not None:
                self._observe(seq)

    def _observe(self, seq: RequestState) -> None:
        """A finished request of the engine's default diffusion updates the adaptive
        policy's tokens per forward (its decoding forwards: prefill ones produce nothing)."""
        if seq.bs == self.block_size and _policy.reassignable(seq.params):
            self.policy.observe(seq.emitted, seq.forwards - seq.prefills)

    def _select(self, members, results, outputs) -> list:
        """The unmasking rule of every member that decides from (token, confidence) rows, run
        for all of them at once (decoding.select_many) -> per member its selection, or None
        (apply() runs its rule itself: logits rules and penalised requests, prefill and commit,
        a lone request). A rule that raises ends the requests it was deciding for (their
        result becomes None)."""
        sel = [None] * len(members)
        idx = [i for i, (m, r) in enumerate(zip(members, results))
               if r is not None and m.plan.decides and not m.seq.needs_logits(m.plan)]
        if len(idx) < 2:  # one request: its own select() in apply() is cheaper
            return sel
        try:
            got = decoding.select_many([members[i].seq.algo for i in idx], [results[i][1] for i in idx],
                                       [members[i].plan.positions for i in idx])
        except Exception as e:
            for i in idx:
                self.scheduler.fail(members[i].seq, outputs, "applying its step", e)
                results[i] = None
            return sel
        for i, g in zip(idx, got):
            sel[i] = g
        return sel
