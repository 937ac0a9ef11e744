"""The scheduler: admission (a KV cache per request, up to max_batch running),
grouping (one forward per block size and output kind: the core's block-causal
mask takes one block size per call, and the rules that fuse logits themselves
and penalised requests need full logits rows), and the batched forward with its retry (a failed call
is retried item by item so only the offending requests fail)."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import group as _group
from .output_processor import RequestOutput, make_output
from .request_state import RequestState, StepPlan

log = logging.getLogger("bitdlm.engine")


@dataclass
class Scheduled:
    """A running request's part of this step."""
    seq: RequestState
    plan: StepPlan
    uniforms: np.ndarray | None  # float32, one per output row; None when it does not sample


@dataclass
class Batch:
    """What one core call carries: the group path's requests (engine/group.py) and the
    per-request plans."""
    group: _group.GroupPlan | None
    members: list[Scheduled]


class GroupKey(NamedTuple):  # a plain tuple: cheap to build and hash
    block_size: int
    mode: str  # "select" (tokens, confidences) | "logits"


class Scheduler:
    def __init__(self, model, max_batch: int, stats, vocab: int, banned: np.ndarray):
        self.model = model
        self.max_batch = max_batch
        self.vocab = vocab
        self.banned = banned  # token ids the core never produces (the mask token)
        self.stats = stats  # EngineStats: forwards and items are counted here
        # rid -> request, in arrival order: admission, lookup and removal in O(1)
        # (a deque scanned per add made generate() of 10^6 prompts quadratic)
        self.waiting: OrderedDict[str, RequestState] = OrderedDict()
        self.running: OrderedDict[str, RequestState] = OrderedDict()
        self.group_path = True  # False: every request plans and applies its own step (the definition)

    # ---------------------------------------------------------------- queues
    def has(self, rid: str) -> bool:
        return rid in self.running or rid in self.waiting

    def add(self, seq: RequestState) -> None:
        self.waiting[seq.rid] = seq

    def remove(self, rid: str) -> RequestState | None:
        """Take a request out (running or waiting) and free its cache."""
        seq = self.running.pop(rid, None)
        if seq is None:
            return self.waiting.pop(rid, None)  # (a waiting request holds no cache and no block row yet)
        self.release(seq)
        return seq

    def release(self, seq: RequestState) -> None:
        seq.release_row()
        if seq.seq_id >= 0:
            self.model.free_seq(seq.seq_id)
            seq.seq_id = -1

    def finish(self, seq: RequestState) -> None:
        """A running request ended normally."""
        del self.running[seq.rid]
        self.release(seq)

    def fail(self, seq: RequestState, outputs: list, where: str, exc: BaseException) -> None:
        """End one request with an error output; the others go on."""
        log.warning("request %s failed while %s: %s: %s", seq.rid, where, type(exc).__name__, exc,
                    exc_info=not isinstance(exc, (ValueError, MemoryError)))
        self.running.pop(seq.rid, None)
        try:
            self.release(seq)
        except Exception:
            log.exception("freeing the cache of request %s failed", seq.rid)
            seq.seq_id = -1
        seq.finish("error")
        outputs.append(make_output(seq, error=f"{where} failed: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------- admission
    def admit(self, outputs: list[RequestOutput]) -> None:
        """Waiting requests get a KV cache, first come first served. Out of KV memory, the
        head waits for a running request to finish, or fails if none runs."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = next(iter(self.waiting.values()))
            try:
                seq_id = self.model.alloc_seq(seq.capacity)
            except MemoryError as e:
                if self.running:
                    return  # wait until a running request frees its cache
                del self.waiting[seq.rid]
                seq.finish("error")
                outputs.append(make_output(seq, error=f"out of KV cache memory: {e}"))
                continue
            except Exception as e:
                del self.waiting[seq.rid]
                self.fail(seq, outputs, "allocating its cache", e)
                continue
            del self.waiting[seq.rid]
            self.running[seq.rid] = seq
            seq.admitted(seq_id)

    # --------------------------------------------------------------- grouping
    def schedule(self, outputs: list) -> dict[GroupKey, Batch]:
        """Every running request's next forward, grouped by what one core call can carry."""
        groups: dict[tuple, list[Scheduled]] = {}
        grouped: dict[int, tuple[list, list]] = {}  # block size -> the group path's (deciding, committing)
        running = list(self.running.values())
        # (too few requests for any group: not even the check)
        grouping = self.group_path and len(running) >= _group.COMMIT_MIN
        for seq in running:
            # the group path's: groupable (RequestState.groupable), a table row, past the prompt
            if grouping and seq.groupable and seq.row >= 0 and not seq.prefilling:
                g = grouped.get(seq.bs)
                if g is None:
                    g = grouped[seq.bs] = ([], [])
                    groups.setdefault((seq.bs, False), [])  # (the calls keep the order of first arrival)
                g[seq.first == len(seq.blk)].append(seq)  # deciding while its block has masks left, else committing
                continue
            self._plan_one(seq, groups, outputs)
        plans = {}
        for bs, (dec, com) in grouped.items():
            dec, com, rest = _group.split(dec, com)
            if dec or com:
                try:
                    plans[bs] = _group.plan(dec, com, (dec or com)[0].table)
                except Exception as e:  # planned one by one below, where a fault is pinned on its request
                    mine = set(map(id, dec + com + rest))
                    rest = [s for s in running if id(s) in mine]  # (in arrival order)
                    log.warning("group plan of %d requests failed (%s: %s); planning them one by one",
                                len(rest), type(e).__name__, e)
            for seq in rest:
                self._plan_one(seq, groups, outputs)
        return {GroupKey(bs, "logits" if lg else "select"): Batch(plans.get(bs) if not lg else None, g)
                for (bs, lg), g in groups.items() if g or (not lg and bs in plans)}

    def _plan_one(self, seq: RequestState, groups: dict, outputs: list) -> None:
        try:
            plan = seq.plan()
            u = seq.draw_uniforms(plan) if seq.temperature > 0 else None  # (greedy: no call)
        except Exception as e:
            self.fail(seq, outputs, "planning its step", e)
            return
        key = (seq.bs, seq.needs_logits(plan))
        g = groups.get(key)
        if g is None:
            g = groups[key] = []
        g.append(Scheduled(seq, plan, u))

    # ---------------------------------------------------------------- forward
    def _call(self, key: GroupKey, members: list[Scheduled], group: _group.GroupPlan | None = None):
        """One model.forward over the group's items, then `members`' -> (the group's (tokens,
        confidences) rows, or None without a group; per member: (tokens, confidences) or logits rows)."""
        items = [m.plan.item for m in members]
        ks = [it.num_out for it in items]
        core_items = [it.as_core() for it in items]
        g0 = 0
        if group is not None:  # (greedy only: the group path takes no sampling request)
            core_items = group.items + core_items
            g0 = sum(group.num_out)
        if key.mode == "logits":
            res = np.asarray(self.model.forward(core_items, key.block_size, "logits")).reshape(sum(ks), self.vocab)
        else:
            temps = tops = unis = None  # greedy rows: the core's defaults (temperature 0, no uniforms)
            if any(m.uniforms is not None for m in members):
                # per output row: its request's temperature, top_p and uniform
                gseqs = group.seqs if group is not None else []
                kall = (group.num_out if group is not None else []) + ks
                temps = np.repeat(np.array([s.temperature for s in gseqs] + [m.seq.temperature for m in members],
                                           np.float32), kall)
                tops = np.repeat(np.array([s.params.top_p for s in gseqs] + [m.seq.params.top_p for m in members],
                                          np.float32), kall)
                unis = np.concatenate([np.zeros(g0, np.float32)] + [
                    np.zeros(k, np.float32) if m.uniforms is None else m.uniforms for m, k in zip(members, ks)])
            tok, conf = self.model.forward(core_items, key.block_size, "select", temperature=temps,
                                           top_p=tops, uniforms=unis, banned=self.banned)
            res = (np.asarray(tok), np.asarray(conf))
        self.stats.forwards += 1
        self.stats.items += len(core_items)
        out, off = [], g0
        for k in ks:
            out.append(res[off:off + k] if key.mode == "logits" else (res[0][off:off + k], res[1][off:off + k]))
            off += k
        return (None if group is None else res), out

    def forward(self, key: GroupKey, batch: Batch, outputs: list):
        """-> (the group's (tokens, confidences) rows, or None; results per member, None where that
        member's forward failed (it is then ended with an error)). A failed batched call is retried
        item by item, the group's requests as per-request plans (batch.group becomes None, its
        requests join batch.members): a bad item fails alone, and a fault that is nobody's (every
        item fails alone too) fails only this step's requests. Retrying is safe: a writing item
        stores the same K/V again, the others change nothing."""
        members = batch.members
        try:
            return self._call(key, members, batch.group)
        except Exception as e:
            if batch.group is not None:
                members = batch.members = [Scheduled(q, p, None) for q, p in batch.group.plans()] + members
                batch.group = None
            if len(members) == 1:
                self.fail(members[0].seq, outputs, "forward", e)
                return None, [None]
            log.warning("batched forward of %d requests failed (%s: %s); retrying them one by one",
                        len(members), type(e).__name__, e)
        results = []
        for m in members:
            try:
                results.append(self._call(key, [m])[1][0])
            except Exception as e:
                self.fail(m.seq, outputs, "forward", e)
                results.append(None)
        return None, results
