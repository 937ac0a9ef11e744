"""Request bodies: the pydantic schemas (strict: wrong JSON types are errors,
not coerced), OpenAI parameters we refuse, and `to_sampling_params`, the ONE
place a request becomes a SamplingParams (new request fields go there).
Imported only when an app is built (pydantic is not imported by the CLI)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import bad

MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOPS = 16
MAX_STOP_CHARS = 1024

_STRICT = ConfigDict(strict=True, extra="forbid")  # wrong JSON types are errors, unknown fields too


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = _STRICT
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=MAX_TEMPERATURE,
                                         allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2 ** 63)
    # penalties (SamplingParams.validate range-checks them); repetition_penalty is vLLM's extra field
    presence_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None  # accepted and ignored
    # bitdlm extras (Fast-dLLM v2 decoding)
    threshold: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    small_block_size: Optional[int] = Field(default=None, ge=1, le=1 << 20)
    use_block_cache: Optional[bool] = None
    ignore_eos: Optional[bool] = None  # as vLLM: keep generating past EOS (benchmarks)
    # decoding algorithm and cache per request, as the LLaDA-style servers took them
    # (bitdlm.decoding; SamplingParams.validate range-checks them)
    generation_algorithm: Optional[str] = None
    factor: Optional[float] = Field(default=None, allow_inf_nan=False)
    credit_alpha: Optional[float] = Field(default=None, allow_inf_nan=False)
    boost_gamma: Optional[float] = Field(default=None, allow_inf_nan=False)
    decay_beta: Optional[float] = Field(default=None, allow_inf_nan=False)
    low_threshold: Optional[float] = Field(default=None, allow_inf_nan=False)
    steps: Optional[int] = Field(default=None, ge=1, le=1 << 20)  # the fixed-rate rule: steps per block
    use_cache: Optional[bool] = None  # false: cache "none" (recompute every step)
    use_dual_cache: Optional[bool] = None  # true: cache "dual" (the sub-block cache)
    block_length: Optional[int] = Field(default=None, ge=1, le=1 << 20)


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None  # accepted and ignored
    metadata: Optional[dict[str, Any]] = None   # accepted and ignored
    store: Optional[bool] = None                # accepted and ignored


class GenerateParams(BaseModel):
    """`sampling_params` of an SGLang-style /generate body."""
    model_config = ConfigDict(strict=True, extra="ignore")
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(default=None, allow_inf_nan=False)


class GenerateRequest(_Common):
    """The users' old server's /generate: `text` or `prompt`, `max_new_tokens` or
    `max_tokens` (also inside SGLang's `sampling_params`)."""
    model_config = ConfigDict(strict=True, extra="ignore")  # their clients send SGLang's other fields
    text: Optional[str] = None
    prompt: Optional[str] = None
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    sampling_params: Optional[GenerateParams] = None

    def merged(self, sp: GenerateParams) -> "GenerateRequest":
        """This request with the sampling values of `sampling_params` where the top level has none."""
        upd = {k: getattr(sp, k) for k in ("temperature", "top_p", "stop", "presence_penalty",
                                           "frequency_penalty", "repetition_penalty")
               if getattr(self, k) is None and getattr(sp, k) is not None}
        return self.model_copy(update=upd)


def validation_error(exc):
    """A pydantic ValidationError -> the 400 APIError naming the first bad field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        return bad(f"Unrecognized request argument supplied: {'.'.join(loc)}", param=param)
    where = ".".join(loc) if loc else "body"
    return bad(f"Invalid value for '{where}': {err.get('msg')} (got {err.get('input')!r:.60}).",
               param=param, code="invalid_type" if err.get("type", "").endswith("_type")
               else "invalid_value")


def reject_unsupported(req, chat: bool) -> None:
    """400 for OpenAI parameters this server does not implement (never ignore them silently)."""
    def no(param, why):
        raise bad(f"Unsupported parameter '{param}': {why}.", param=param,
                  code="unsupported_parameter")

    if req.n != 1:
        no("n", "only n=1 is supported")
    if req.logit_bias:
        no("logit_bias", "not supported")
    if req.stream_options is not None and not req.stream:
        raise bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                  param="stream_options")
    if chat:
        if req.logprobs or req.top_logprobs:
            no("logprobs", "log probabilities are not supported")
        if req.tools or req.tool_choice not in (None, "none"):
            no("tools", "tool calling is not supported")
        if req.response_format not in (None, {"type": "text"}):
            no("response_format", "only text responses are supported")
    else:
        if req.logprobs:
            no("logprobs", "log probabilities are not supported")
        if req.echo:
            no("echo", "not supported")
        if req.best_of not in (None, 1):
            no("best_of", "only best_of=1 is supported")
        if req.suffix:
            no("suffix", "not supported")


def check_stop_limits(req) -> None:
    """The server's own bounds on stop strings (the values themselves are checked by
    SamplingParams.validate)."""
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOPS:
        raise bad(f"At most {MAX_STOPS} stop strings are supported.", param="stop",
                  code="invalid_value")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"Stop strings must be 1 to {MAX_STOP_CHARS} characters long.", param="stop",
                  code="invalid_value")


def context_exceeded(max_model_len: int, n_prompt: int, max_tokens: int):
    return bad(f"This model's maximum context length is {max_model_len} tokens. However, you "
               f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
               "for the completion). Please reduce the prompt or the completion length.",
               param="max_tokens", code="context_length_exceeded")


DECODING_FIELDS = ("block_length", "small_block_size", "generation_algorithm", "steps")


def to_sampling_params(req, *, max_tokens, n_prompt: int, max_model_len: int, defaults: dict):
    """The SamplingParams of a validated request: server defaults, then the
    request's fields. The one function to extend with new request fields."""
    from ..sampling_params import SamplingParamError, SamplingParams

    check_stop_limits(req)
    if max_tokens is None:
        max_tokens = max_model_len - n_prompt
    if n_prompt + max_tokens > max_model_len:
        raise context_exceeded(max_model_len, n_prompt, max_tokens)
    kw = dict(defaults)
    kw["max_tokens"] = max_tokens
    for k in ("temperature", "top_p", "seed", "threshold", "small_block_size", "presence_penalty",
              "frequency_penalty", "repetition_penalty",
              "use_block_cache", "ignore_eos", "generation_algorithm", "factor", "credit_alpha",
              "boost_gamma", "decay_beta", "low_threshold", "steps", "block_length"):
        v = getattr(req, k)
        if v is not None:
            kw[k] = v
    if req.use_cache is False and req.use_dual_cache:
        raise bad("use_dual_cache needs the cache: it contradicts use_cache=false.",
                  param="use_dual_cache")
    if req.use_cache is False:
        kw["cache"], kw["use_block_cache"] = "none", False
    elif req.use_dual_cache is not None:
        kw["cache"] = "dual" if req.use_dual_cache else "prefix"
        kw["use_block_cache"] = bool(req.use_dual_cache)
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    # the client's own choice of decoding (not a server default): --decode-policy adaptive keeps it
    kw["decoding_set"] = any(getattr(req, k) is not None for k in DECODING_FIELDS)
    sp = SamplingParams(**kw)
    try:
        sp.validate()
    except SamplingParamError as e:
        raise bad(f"Invalid sampling parameters: {e}", param=e.param, code="invalid_value")
    return sp


def check_prompt_ids(ids, what: str, *, max_model_len: int, vocab_size: int) -> None:
    if not ids:
        raise bad(f"The {what} is empty.", param="prompt")
    if len(ids) >= max_model_len:
        raise bad(f"This model's maximum context length is {max_model_len} tokens, "
                  f"and the {what} alone has {len(ids)} tokens.", param="prompt",
                  code="context_length_exceeded")
    if min(ids) < 0 or max(ids) >= vocab_size:  # C loops: a 5M-id body took seconds in Python
        t = next(t for t in ids if not 0 <= t < vocab_size)
        raise bad(f"Token id {t} is out of range [0, {vocab_size}).", param="prompt")
