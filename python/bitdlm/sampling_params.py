"""`SamplingParams`: what one request asks for (sampling, stopping, decoding algorithm, cache).

Imported by both the engine and the offline API (`bitdlm.SamplingParams`,
`bitdlm.llm.SamplingParams` re-export it). `validate()` rejects every value the
C++ core or the engine would reject later, so a request that passes it cannot
fail a batched step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import decoding


# Temperatures below this decode greedily (as vLLM's 1e-5): logits / T overflows float32 for
# tiny T (1e-40 gives NaN confidences in the core), and such a T is greedy in all but name.
# The one greedy constant: the engine reads temperatures through effective_temperature().
GREEDY_BELOW = 1e-5

# Largest per-request block_length, and most sub-blocks per block: a step of a
# request computes up to a whole block, and every request of the batch waits
# for it (block_length 2048 with small_block_size 1 took 32 s for 4 tokens and
# made its neighbour 290x slower). 256 is 8x the block size Fast-dLLM v2 models
# are trained with. docs/server.md "Limits".
MAX_BLOCK_LENGTH = 256
MAX_SUB_BLOCKS = 32

# presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's and vLLM's range)
MAX_PENALTY = 2.0


class SamplingParamError(ValueError):
    """A bad sampling value; `param` names the field (the HTTP error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _named(param: str, check, value):
    """Run a bitdlm.decoding check, its ValueError naming `param`."""
    try:
        return check(value)
    except SamplingParamError:
        raise
    except ValueError as e:
        raise SamplingParamError(param, str(e)) from None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _f32(x) -> float:
    """x as the core sees it (float32): 1e-320 becomes 0.0, 1e39 becomes inf."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(x))


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings (not included in the text)
    threshold: float | None = None  # unmask confidence threshold in (0, 1]; None = model default
    small_block_size: int | None = None  # None = model default
    use_block_cache: bool = False  # legacy spelling of cache="dual"
    stop_token_ids: list[int] | None = None  # extra stop tokens besides the model's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # sampling penalties (bitdlm.penalties; off by default): OpenAI's, over the generated tokens
    presence_penalty: float = 0.0  # [-2, 2]: logit -= presence_penalty where the token was generated
    frequency_penalty: float = 0.0  # [-2, 2]: logit -= frequency_penalty * times it was generated
    repetition_penalty: float = 1.0  # > 0 (HF / vLLM): prompt or generated ids' logit / p if > 0 else * p
    # decoding algorithm (bitdlm.decoding): "threshold" | "factor" | "credit" | "hierarchy" | "steps",
    # or an old LLaDA-server alias ("basic", "dual_cache", "dinfer_hierarchy", ...: decoding.ALIASES)
    generation_algorithm: str = decoding.DEFAULT_ALGORITHM
    factor: float | None = None  # factor rule; None = 1.0
    credit_alpha: float | None = None  # credit rule; None = 0.7
    boost_gamma: float | None = None  # credit rule; None = 0.2
    decay_beta: float | None = None  # credit rule; None = 0.8
    low_threshold: float | None = None  # hierarchy rule; None = 0.4
    steps: int | None = None  # steps rule (LLaDA's fixed rate): steps per block; None = block_length
    cache: str | None = None  # "none" | "prefix" | "dual"; None = "dual" if use_block_cache else "prefix"
    block_length: int | None = None  # per-request block size; None = the engine's
    # whether the caller chose the decoding (block_length, small_block_size, generation_algorithm,
    # steps), which --decode-policy adaptive then never changes; None = judged from those fields
    # (engine/policy.py reassignable). The server sets it from the request body.
    decoding_set: bool | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def effective_temperature(self) -> float:
        t = float(self.temperature)
        return 0.0 if t < GREEDY_BELOW else t

    def penalized(self) -> bool:
        """Whether any penalty is on (the engine then decodes from full logits rows)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def cache_strategy(self) -> str:
        if self.cache is not None:
            return self.cache
        if self.use_block_cache:
            return "dual"
        return decoding.alias_cache(self.generation_algorithm) or "prefix"

    def algorithm_values(self) -> dict:
        """The parameters of the chosen algorithm that were set (unset ones take their defaults)."""
        cls = decoding.REGISTRY[decoding.rule_of(self.generation_algorithm)]
        return {p.name: getattr(self, p.name) for p in cls.params if getattr(self, p.name) is not None}

    def validate(self) -> None:
        """The one check of sampling values (the Python API, the engine and the server all
        call it): raises SamplingParamError (a ValueError naming the field) for every value
        the C++ core or the engine would reject later."""
        def bad(param, msg):
            raise SamplingParamError(param, msg)

        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            bad("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or not math.isfinite(_f32(self.temperature)) or self.temperature < 0:
            bad("temperature", f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_num(self.top_p) or not (0 < _f32(self.top_p) <= 1) or not (0 < self.top_p <= 1):
            bad("top_p", f"top_p must be in (0, 1] (as a float32: 1e-320 is 0), got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's range
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(_f32(v)) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                bad(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
        r = self.repetition_penalty
        if not _is_num(r) or not math.isfinite(_f32(r)) or not _f32(r) > 0:
            bad("repetition_penalty", f"repetition_penalty must be a finite number > 0 "
                f"(1 = off; as a float32: 1e-320 is 0), got {r!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad("seed", f"seed must be a non-negative integer or None, got {self.seed!r}")
        if self.small_block_size is not None and (not _is_int(self.small_block_size)
                                                  or self.small_block_size < 1):
            bad("small_block_size",
                f"small_block_size must be a positive integer, got {self.small_block_size!r}")
        if self.block_length is not None and (not _is_int(self.block_length)
                                              or not 1 <= self.block_length <= MAX_BLOCK_LENGTH):
            bad("block_length", f"block_length must be an integer in [1, {MAX_BLOCK_LENGTH}], "
                f"got {self.block_length!r}")
        if self.decoding_set is not None and not isinstance(self.decoding_set, (bool, np.bool_)):
            bad("decoding_set", f"decoding_set must be a bool or None, got {self.decoding_set!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                bad(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        stops = self.stop_list()
        if not all(isinstance(s, str) and s for s in stops):
            bad("stop", "stop must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and (
                not isinstance(self.stop_token_ids, (list, tuple))
                or not all(_is_int(t) and 0 <= t < 1 << 31 for t in self.stop_token_ids)):
            bad("stop_token_ids", "stop_token_ids must be a list of token ids")
        if not isinstance(self.use_block_cache, bool):
            bad("use_block_cache", f"use_block_cache must be a bool, got {self.use_block_cache!r}")
        if self.cache is not None:
            _named("cache", decoding.check_cache, self.cache)
            if self.use_block_cache and self.cache != "dual":
                bad("use_block_cache", f"use_block_cache=True means cache='dual', but cache={self.cache!r}")
        if not isinstance(self.generation_algorithm, str):
            bad("generation_algorithm",
                f"generation_algorithm must be a string; valid: {', '.join(decoding.names())}")
        _named("generation_algorithm", decoding.check_name, self.generation_algorithm)
        # every algorithm parameter is range-checked, also those the chosen rule ignores
        seen = set()
        for cls in decoding.REGISTRY.values():
            for p in cls.params:
                v = getattr(self, p.name)
                if p.name not in seen and v is not None:
                    _named(p.name, p.check, v)
                seen.add(p.name)
        if self.threshold is not None and not _f32(self.threshold) > 0:
            bad("threshold", f"threshold must be in (0, 1] (as a float32: 1e-320 is 0), got {self.threshold!r}")
