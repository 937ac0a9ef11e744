"""Fast-dLLM v2 block-diffusion engine for many requests (reference.md section 3),
split the vLLM v1 way:

- core.py              Engine: request checks, the step loop, statistics
- scheduler.py         admission, grouping into forwards, the batched forward and its retry
- request_state.py     one request's block walk: plan its next forward, apply the result
                       (the cache strategies' meaning), typed ForwardItem / StepPlan
- group.py             the group path: the same steps for the greedy, cached requests of one
                       block size at once, a few numpy calls over their rows of a block table
- output_processor.py  final tokens, finish checks, incremental text and stop strings
- policy.py            the decode policy: fixed, or the opt-in adaptive one that assigns a
                       request AR or diffusion at admission from timed forward costs

Every request walks through: chunked prefill of the prompt part that fills
whole blocks (KV written) -> blocks aligned to absolute positions, each decoded
sub-block by sub-block (left to right) with mask tokens -> one committing
forward per finished block (KV written; with token shift its last logits give
the first token of the next block). One `model.forward` call per `step()`
carries one item for every running request, whatever its phase -- one call per
block size when requests ask for different ones (`SamplingParams.block_length`),
and a separate call for the requests whose rule needs full logits (the credit
decoder). Per request: the unmasking rule (bitdlm.decoding: threshold | factor |
credit) and the cache strategy (none | prefix | dual, see request_state.py).

An exception while planning, running or applying one request's step ends that
request alone (finish_reason "error", `error` set). When a batched forward
raises, its items are retried one by one so only the offending ones fail.

Block size 1 with shift is plain autoregressive decoding.
"""
from __future__ import annotations

from .core import Engine, EngineStats
from .output_processor import OutputProcessor, RequestOutput
from .request_state import BlockConfig, ForwardItem, RequestState, StepPlan
from .scheduler import Scheduler

__all__ = ["Engine", "EngineStats", "RequestOutput", "OutputProcessor", "Scheduler", "RequestState",
           "ForwardItem", "StepPlan", "BlockConfig"]
