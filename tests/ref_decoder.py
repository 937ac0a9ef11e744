"""Independent reference decoder for Fast-dLLM v2 block diffusion.

Written directly on top of transformers' BitNetForCausalLM (fp32, online
autobitlinear quantization) with 4D additive float masks and a DynamicCache
(reference.md sections 2 and 3). It shares no code with bitdlm.engine: it
follows the shape of the upstream loop (a growing token list, a cache that is
cropped after every non-committing step) so that the two implementations can
only agree if both follow the algorithm.

Greedy decoding only (temperature 0): confidence = max softmax probability,
with the mask token excluded before the softmax.

Unmasking rules (`algorithm`), each written here from its paper / upstream
description, not from bitdlm.decoding:
- "threshold": Fast-dLLM v2 (confidence > threshold, plus the most confident);
- "factor": Fast-dLLM v1 dynamic parallel decoding: walk the confidences in
  decreasing order, keep the k-th while c_k >= 1 - factor / (k + 1) (the first
  always), stop at the first that fails (upstream's "all when only the last
  fails" off-by-one is not reproduced);
- "hierarchy": dInfer's hierarchy decoder: split the sub-block's masked positions
  into runs of neighbours; a run's most confident position is taken when above
  low_threshold, any position above threshold is taken, and so is the most
  confident of all;
- "credit": dInfer's credit decoder, with its dense [positions, vocab] credit
  matrix: decay by decay_beta every step of the block but the first, add
  top1_prob ** boost_gamma at each masked position's top-1 token, decode the
  logits + credit_alpha * log(credit + 1) with the threshold rule;
- "steps": LLaDA's fixed rate (`generate(steps=...)`): the block's steps are
  dealt out evenly to its sub-blocks, the remainder to the first ones (as LLaDA
  deals its steps to its blocks); a sub-block that starts with m masks gets the
  per-step counts of LLaDA's get_num_transfer_tokens (m // s each, plus one for
  the first m % s steps), filled with the most confident masks (ties: left-most).
Cache strategies (`cache`): "prefix" (committed blocks cached), "dual" (the
sub-block cache), "none" (every forward recomputes the whole sequence from
position 0 with an empty cache).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

NEG = torch.finfo(torch.float32).min


def _additive_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    # block rule: query p sees key q iff block(q) <= block(p); 4D additive float mask
    ok = (kv_pos[None, :] // block_size) <= (q_pos[:, None] // block_size)
    return torch.where(ok, 0.0, NEG).to(torch.float32)[None, None]


class RefDecoder:
    def __init__(self, model, *, block_size: int, mask_id: int | None, shift: bool,
                 max_len: int | None = None, forward=None):
        """`model`: transformers' BitNetForCausalLM. `forward`: optionally another
        forward to drive this same algorithm with, `forward(ids, start, write) ->
        fp32 logits [len(ids), vocab]` over a cache the callable keeps itself
        (write=True appends the K/V of `ids`, at absolute positions start..);
        this separates the decoding algorithm from the numerics."""
        self.model = model.eval() if model is not None else None
        self.forward = forward
        self.bs = block_size
        self.mask_id = mask_id
        self.shift = shift
        self.max_len = max_len or model.config.max_position_embeddings
        self.forwards = 0
        # Closeness of every greedy decision, for telling a float near-tie from
        # a bug when another implementation disagrees: margins[i] is the
        # smallest gap (in probability) of decision step i (top-1 vs top-2
        # token, a confidence vs the threshold, the most confident position
        # vs the runner-up); decided_at[pos] is the step that fixed token pos.
        self.margins: list[float] = []
        self.decided_at: dict[int, int] = {}

    def _decide(self, probs: torch.Tensor, positions, extra: float = float("inf")) -> None:
        top2 = probs.topk(2, dim=-1).values
        gap = float((top2[..., 0] - top2[..., 1]).min()) if len(positions) else float("inf")
        for p in positions:
            self.decided_at[p] = len(self.margins)
        self.margins.append(min(gap, extra))

    def closest_call_before(self, pos: int) -> float:
        """Smallest decision margin up to the step that decided token `pos`."""
        return min(self.margins[:self.decided_at[pos] + 1])

    @torch.no_grad()
    def _run(self, ids, q_start: int, cache: DynamicCache, kv_pos: torch.Tensor) -> torch.Tensor:
        """Forward `ids` at positions q_start.. against `cache` whose keys sit at
        the absolute positions `kv_pos` (in cache order). Returns fp32 logits."""
        n = len(ids)
        q_pos = torch.arange(q_start, q_start + n)
        mask = _additive_mask(q_pos, torch.cat([kv_pos, q_pos]), self.bs)
        out = self.model(torch.tensor([ids]), attention_mask=mask, position_ids=q_pos[None],
                         past_key_values=cache, use_cache=True)
        self.forwards += 1
        return self._banned(out.logits[0].float())

    def _banned(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mask_id is not None:
            logits[:, self.mask_id] = float("-inf")
        return logits

    def _eval(self, ids, start: int, cache: DynamicCache, write: bool) -> torch.Tensor:
        """Logits of `ids` at start.. seeing the cached prefix; K/V kept iff write."""
        if self.forward is not None:
            self.forwards += 1
            return self._banned(torch.as_tensor(self.forward(list(ids), start, write), dtype=torch.float32).clone())
        logits = self._run(ids, start, cache, torch.arange(start))
        if not write:
            cache.crop(-len(ids))
        return logits

    def _shifted(self, logits: torch.Tensor) -> torch.Tensor:
        # with token shift, the logits at i-1 predict token i (row 0 is unusable)
        return torch.cat([logits[:1], logits[:-1]]) if self.shift else logits

    def _pick(self, algorithm: str, conf: torch.Tensor, masked: torch.Tensor, threshold: float, factor: float,
              low_threshold: float = 0.4, count: int = 0):
        """Indices of the sub-block to unmask and the decision's closeness (for near-tie excuses)."""
        cm = conf[masked]
        if algorithm == "steps":
            ranked = sorted(torch.nonzero(masked).flatten().tolist(), key=lambda j: (-float(conf[j]), j))
            extra = float(conf[ranked[count - 1]] - conf[ranked[count]]) if count < len(ranked) else float("inf")
            return sorted(ranked[:count]), extra
        if algorithm in ("threshold", "credit"):
            c = torch.where(masked, conf, torch.tensor(-1.0))
            sel = c > threshold
            sel[int(c.argmax())] = True
            sel &= masked
            extra = float((cm - threshold).abs().min()) if threshold < 1.0 else float("inf")
            if len(cm) > 1:
                c2 = cm.topk(2).values
                extra = min(extra, float(c2[0] - c2[1]))
            return torch.nonzero(sel).flatten().tolist(), extra
        if algorithm == "hierarchy":
            idx = torch.nonzero(masked).flatten().tolist()
            runs, extra = [], float("inf")
            for j in idx:
                if runs and runs[-1][-1] == j - 1:
                    runs[-1].append(j)
                else:
                    runs.append([j])
            keep = set()
            for run in runs:
                vals = sorted((float(conf[j]) for j in run), reverse=True)
                best = vals[0]
                extra = min(extra, abs(best - low_threshold))
                if len(vals) > 1:
                    extra = min(extra, vals[0] - vals[1])
                if best > low_threshold:
                    keep |= {j for j in run if float(conf[j]) == best}
            for j in idx:
                extra = min(extra, abs(float(conf[j]) - threshold))
                if float(conf[j]) > threshold:
                    keep.add(j)
            keep.add(max(idx, key=lambda j: (float(conf[j]), -j)))
            return sorted(keep), extra
        assert algorithm == "factor", algorithm
        idx = torch.nonzero(masked).flatten().tolist()
        ranked = sorted(idx, key=lambda j: -float(conf[j]))
        keep, extra = [], float("inf")
        for k, j in enumerate(ranked, start=1):
            bound = 1.0 - factor / (k + 1)
            if k > 1:
                extra = min(extra, abs(float(conf[j]) - bound), float(conf[ranked[k - 2]]) - float(conf[j]))
            if k == 1 or float(conf[j]) >= bound:
                keep.append(j)
            else:
                break
        return sorted(keep), extra

    def generate(self, prompt, *, max_new_tokens: int, small_block_size: int, threshold: float = 0.9,
                 stop_ids=(), use_block_cache: bool = False, algorithm: str = "threshold",
                 factor: float = 1.0, credit_alpha: float = 0.7, boost_gamma: float = 0.2,
                 decay_beta: float = 0.8, low_threshold: float = 0.4, cache: str | None = None,
                 steps: int | None = None) -> list[int]:
        cache_mode = cache or ("dual" if use_block_cache else "prefix")
        use_block_cache = cache_mode == "dual"
        none = cache_mode == "none"
        bs, M = self.bs, self.mask_id
        x = list(prompt)
        P = len(x)
        limit = min(P + max_new_tokens, self.max_len)
        stop_ids = set(stop_ids)
        cache = DynamicCache()
        self.margins, self.decided_at = [], {}

        def done(seq) -> bool:
            gen = seq[P:limit]
            for i, t in enumerate(gen):
                if t == M:
                    return False
                if t in stop_ids:
                    return True
            return len(gen) == limit - P

        nfull = P // bs * bs
        if nfull and (not none or (self.shift and nfull == P)):
            logits = self._eval(x[:nfull], 0, cache, write=not none)
            if self.shift and nfull == P:
                x.append(int(logits[-1].argmax()))
                self._decide(torch.softmax(logits[-1], -1), [len(x) - 1])

        committed = nfull
        while not done(x):
            bstart = committed
            bend = min(bstart + bs, self.max_len)
            x = x + [M] * (bend - len(x))
            blk_kv = None
            credit = torch.zeros(bend - bstart, self.model.config.vocab_size if self.model is not None
                                 else 0) if algorithm == "credit" else None
            credit_steps = 0
            for s0 in range(0, bend - bstart, small_block_size):
                s1 = min(s0 + small_block_size, bend - bstart)
                if algorithm == "steps":  # this sub-block's share of the steps, then LLaDA's counts per step
                    n_sub, total = bs // small_block_size, steps or bs
                    s_j = total // n_sub + (1 if s0 // small_block_size < total % n_sub else 0)
                    m = sum(t == M for t in x[bstart + s0:bstart + s1])
                    counts = [m // s_j + (1 if i < m % s_j else 0) for i in range(s_j)]
                while any(t == M for t in x[bstart + s0:bstart + s1]) and not done(x):
                    blk = x[bstart:bend]
                    if use_block_cache and self.forward is not None:
                        raise NotImplementedError("the sub-block cache needs the transformers model")
                    if use_block_cache and (blk_kv is None or blk[s0] == M):
                        logits = self._run(blk, bstart, cache, torch.arange(bstart))
                        blk_kv = [(layer.keys[:, :, bstart:].clone(), layer.values[:, :, bstart:].clone())
                                  for layer in cache.layers]
                        cache.crop(-len(blk))
                        lg = self._shifted(logits)[s0:s1]
                    elif use_block_cache:
                        # the sub-block alone against prefix + the block's stale K/V,
                        # its own positions replaced by fresh K/V
                        kv = []
                        for layer, (bk, bv) in zip(cache.layers, blk_kv):
                            kv.append((torch.cat([layer.keys, bk[:, :, :s0], bk[:, :, s1:]], 2),
                                       torch.cat([layer.values, bv[:, :, :s0], bv[:, :, s1:]], 2)))
                        tmp = DynamicCache(ddp_cache_data=kv)
                        kv_pos = torch.cat([torch.arange(bstart + s0), torch.arange(bstart + s1, bend)])
                        logits = self._run(blk[s0:s1], bstart + s0, tmp, kv_pos)
                        lg = self._shifted(logits)
                    elif none:
                        logits = self._eval(x[:bend], 0, cache, write=False)
                        lg = self._shifted(logits)[bstart + s0:bstart + s1]
                    else:
                        logits = self._eval(blk, bstart, cache, write=False)
                        lg = self._shifted(logits)[s0:s1]
                    masked = torch.tensor([t == M for t in blk[s0:s1]])
                    if credit is not None:
                        if credit.shape[1] == 0:
                            credit = torch.zeros(bend - bstart, lg.shape[1])
                        if credit_steps:
                            credit *= decay_beta
                        credit_steps += 1
                        p_raw = torch.softmax(lg, dim=-1)
                        top_p, top_i = p_raw.max(dim=-1)
                        for j in range(s1 - s0):
                            if masked[j]:
                                credit[s0 + j, top_i[j]] += top_p[j] ** boost_gamma
                        lg = lg + credit_alpha * torch.log(credit[s0:s1] + 1)
                    probs = torch.softmax(lg, dim=-1)
                    conf, tok = probs.max(dim=-1)
                    picked, extra = self._pick(algorithm, conf, masked, threshold, factor, low_threshold,
                                               counts.pop(0) if algorithm == "steps" else 0)
                    self._decide(probs[picked], [bstart + s0 + j for j in picked], extra)
                    for j in picked:
                        x[bstart + s0 + j] = int(tok[j])
            if done(x):
                break
            # commit: block has no masks left; write its K/V
            committed = bend
            if none:
                if self.shift:  # the last logits of the sequence give the next block's first token
                    logits = self._eval(x[:bend], 0, cache, write=False)
                    x.append(int(logits[-1].argmax()))
                    self._decide(torch.softmax(logits[-1], -1), [len(x) - 1])
                continue
            logits = self._eval(x[bstart:bend], bstart, cache, write=True)
            if self.shift:
                x.append(int(logits[-1].argmax()))
                self._decide(torch.softmax(logits[-1], -1), [len(x) - 1])

        gen = x[P:limit]
        for i, t in enumerate(gen):
            if t in stop_ids:
                return gen[:i + 1]
        return gen
