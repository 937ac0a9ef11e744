"""final_only requests (what LLM.generate adds): no output until the end, then one with every
token and the whole text. The tokens, text, finish reason and forwards must be exactly what
the same request's per-step outputs join into, whatever ends it (EOS, length, a stop string
or stop token, the context) and however it decodes (diffusion, AR, the steps rule, sampling,
penalties, the sub-block cache). On the packaged tiny model (no torch)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from bitdlm.engine import Engine  # noqa: E402
from bitdlm.llm import LLM, SamplingParams  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass Path", "Olá, ñandú 😀 — ", "x = [", "# "]
PARAMS = [
    SamplingParams(max_tokens=40),
    SamplingParams(max_tokens=40, stop=["\n\n"]),
    SamplingParams(max_tokens=60, stop=["):", "self", "ñ"]),
    SamplingParams(max_tokens=30, block_length=1),
    SamplingParams(max_tokens=48, generation_algorithm="steps", steps=8, use_block_cache=True),
    SamplingParams(max_tokens=33, temperature=0.9, top_p=0.9, seed=5),
    SamplingParams(max_tokens=40, repetition_penalty=1.2, skip_special_tokens=False),
    SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=[13]),
    SamplingParams(max_tokens=5),
]


def _run(engine: Engine, final_only: bool) -> dict:
    """Every (prompt, params) request at once -> rid -> (ids, text, reason, forwards, outputs)."""
    rid = 0
    for p in PROMPTS:
        ids = engine.check_prompt(engine.tokenizer.encode(p))
        for sp in PARAMS:
            engine.add_checked(str(rid), ids, sp, final_only=final_only)
            rid += 1
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            ids, text, _, _, n = got.get(out.request_id, ([], "", None, 0, 0))
            got[out.request_id] = (ids + out.new_token_ids, text + out.text, out.finish_reason, out.forwards, n + 1)
    return got


@pytest.fixture(scope="module")
def llm():
    return LLM(max_batch=16)


def test_final_only_equals_the_joined_steps(llm):
    steps = _run(llm.engine, final_only=False)
    final = _run(llm.engine, final_only=True)
    assert set(final) == set(steps) and len(final) == len(PROMPTS) * len(PARAMS)
    reasons = set()
    for rid, (ids, text, reason, forwards, n_out) in final.items():
        assert n_out == 1  # one output, at the end
        assert (ids, text, reason, forwards) == steps[rid][:4], rid
        reasons.add(reason)
    assert {"stop", "length"} <= reasons
    assert any(steps[r][4] > 1 for r in steps)  # the per-step side did stream
    # a stop string cut some text: the final side reproduced a per-step cut
    assert any(PARAMS[int(r) % len(PARAMS)].stop and steps[r][2] == "stop" for r in steps)


def test_llm_generate_is_final_only_and_equals_streaming(llm):
    """LLM.generate (final_only) against generate_stream (per step), prompt by prompt."""
    for p in PROMPTS[:3]:
        for sp in PARAMS[:3]:
            g = llm.generate(p, sp)[0]
            deltas = list(llm.generate_stream(p, sp))
            s = llm.last
            assert g.text == "".join(deltas) == s.text
            assert (g.token_ids, g.finish_reason, g.stats["forwards"]) == (s.token_ids, s.finish_reason,
                                                                           s.stats["forwards"])
