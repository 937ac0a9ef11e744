"""Independent reference decoder for Fast-dLLM v2 block diffusion.

Written directly on top of transformers' BitNetForCausalLM (fp32, online
autobitlinear quantization) with 4D additive float masks and a DynamicCache
(reference.md sections 2 and 3). It shares no code with bitdlm.engine: it
follows the shape of the upstream loop (a growing token list, a cache that is
cropped after every non-committing step) so that the two implementations can
only agree if both follow the algorithm.

Greedy decoding only (temperature 0): confidence = max softmax probability,
with the mask token excluded before the softmax.
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
                 max_len: int | None = None):
        self.model = model.eval()
        self.bs = block_size
        self.mask_id = mask_id
        self.shift = shift
        self.max_len = max_len or model.config.max_position_embeddings
        self.forwards = 0

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
        logits = out.logits[0].float()
        if self.mask_id is not None:
            logits[:, self.mask_id] = float("-inf")
        return logits

    def _shifted(self, logits: torch.Tensor) -> torch.Tensor:
        # with token shift, the logits at i-1 predict token i (row 0 is unusable)
        return torch.cat([logits[:1], logits[:-1]]) if self.shift else logits

    def generate(self, prompt, *, max_new_tokens: int, small_block_size: int, threshold: float,
                 stop_ids=(), use_block_cache: bool = False) -> list[int]:
        bs, M = self.bs, self.mask_id
        x = list(prompt)
        P = len(x)
        limit = min(P + max_new_tokens, self.max_len)
        stop_ids = set(stop_ids)
        cache = DynamicCache()

        def done(seq) -> bool:
            gen = seq[P:limit]
            for i, t in enumerate(gen):
                if t == M:
                    return False
                if t in stop_ids:
                    return True
            return len(gen) == limit - P

        nfull = P // bs * bs
        if nfull:
            logits = self._run(x[:nfull], 0, cache, torch.arange(0))
            if self.shift and nfull == P:
                x.append(int(logits[-1].argmax()))

        while not done(x):
            bstart = cache.get_seq_length()
            bend = min(bstart + bs, self.max_len)
            x = x + [M] * (bend - len(x))
            blk_kv = None
            for s0 in range(0, bend - bstart, small_block_size):
                s1 = min(s0 + small_block_size, bend - bstart)
                while any(t == M for t in x[bstart + s0:bstart + s1]) and not done(x):
                    blk = x[bstart:bend]
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
                    else:
                        logits = self._run(blk, bstart, cache, torch.arange(bstart))
                        cache.crop(-len(blk))
                        lg = self._shifted(logits)[s0:s1]
                    probs = torch.softmax(lg, dim=-1)
                    conf, tok = probs.max(dim=-1)
                    masked = torch.tensor([t == M for t in blk[s0:s1]])
                    conf = torch.where(masked, conf, torch.tensor(-1.0))
                    sel = conf > threshold
                    sel[int(conf.argmax())] = True
                    sel &= masked
                    for j in torch.nonzero(sel).flatten().tolist():
                        x[bstart + s0 + j] = int(tok[j])
            if done(x):
                break
            # commit: block has no masks left; write its K/V
            logits = self._run(x[bstart:bend], bstart, cache, torch.arange(bstart))
            if self.shift:
                x.append(int(logits[-1].argmax()))

        gen = x[P:limit]
        for i, t in enumerate(gen):
            if t in stop_ids:
                return gen[:i + 1]
        return gen
