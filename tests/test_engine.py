"""Scheduler tests: bitdlm's Engine / LLM (on the C++ forward, bitdlm.load)
against the independent reference decoder (tests/ref_decoder.py, transformers
+ DynamicCache) on tiny random BitNet models converted with bitdlm.convert."""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitdlm.engine import Engine  # noqa: E402
from bitdlm.llm import LLM, SamplingParams  # noqa: E402
from bitdlm.tokenizer import Tokenizer  # noqa: E402

from engine_models import BS, SBS, Tiny, backend, prompt_ids  # noqa: E402
from ref_decoder import RefDecoder  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def tok_json(models):
    return models[True].meta["tokenizer_json"]


def _ref(m: Tiny, prompt, *, max_tokens, threshold, use_block_cache=False, block_size=BS, sbs=SBS,
         stop_ids=None, max_len=None):
    meta = m.meta
    d = meta["diffusion"]
    r = RefDecoder(m.hf, block_size=block_size, mask_id=meta["mask_token_id"], shift=d["shift_logits"],
                   max_len=max_len)
    return r.generate(prompt, max_new_tokens=max_tokens, small_block_size=sbs, threshold=threshold,
                      stop_ids=meta["eos_token_ids"] if stop_ids is None else stop_ids,
                      use_block_cache=use_block_cache)


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("plen", [1, BS - 1, BS, BS + 1])
def test_matches_reference(models, shift, threshold, plen):
    m = models[shift]
    meta = m.meta
    prompt = prompt_ids(plen, seed=plen)
    want = _ref(m, prompt, max_tokens=20, threshold=threshold)
    llm = LLM(backend(m))
    got = llm.generate(prompt, SamplingParams(max_tokens=20, threshold=threshold, ignore_eos=False))[0]
    assert got.token_ids == want
    assert got.stats["forwards"] > 0


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("threshold", [0.9, 0.5])
@pytest.mark.parametrize("plen", [1, BS - 1, BS, BS + 1])
def test_block_cache_matches_reference(models, shift, threshold, plen):
    m = models[shift]
    meta = m.meta
    prompt = prompt_ids(plen, seed=100 + plen)
    want = _ref(m, prompt, max_tokens=16, threshold=threshold, use_block_cache=True)
    got = LLM(backend(m)).generate(
        prompt, SamplingParams(max_tokens=16, threshold=threshold, use_block_cache=True))[0]
    assert got.token_ids == want


def test_parallel_decoding_happens(models):
    # the fixture is sharp enough that a lower threshold unmasks several tokens per step
    m = models[True]
    prompt = prompt_ids(5, seed=16)
    llm = LLM(backend(m))
    f = {thr: llm.generate(prompt, SamplingParams(max_tokens=24, threshold=thr, ignore_eos=True))[0]
         for thr in (1.0, 0.5)}
    assert f[1.0].stats["forwards"] >= 24  # one token per step, plus commits
    assert f[0.5].stats["tokens_per_forward"] > 1.3 * f[1.0].stats["tokens_per_forward"]


def test_block_cache_changes_the_computation(models):
    # the sub-block cache attends to stale K/V: it must not silently fall back to full passes
    m = models[True]
    meta = m.meta
    prompt = prompt_ids(BS + 1, seed=5)
    be = backend(m)
    LLM(be).generate(prompt, SamplingParams(max_tokens=16, threshold=0.9, use_block_cache=True))
    assert any(n < BS for n in be.token_counts)


def test_batch_equals_alone(models):
    m = models[True]
    meta = m.meta
    prompts = [prompt_ids(n, seed=10 + n) for n in (1, BS - 1, BS, 2 * BS + 3)]
    params = [SamplingParams(max_tokens=12, threshold=0.9), SamplingParams(max_tokens=7, threshold=0.5),
              SamplingParams(max_tokens=16, threshold=1.0, use_block_cache=True),
              SamplingParams(max_tokens=10, threshold=0.7, small_block_size=2)]
    alone = [LLM(backend(m)).generate(p, sp)[0] for p, sp in zip(prompts, params)]
    be = backend(m)
    llm = LLM(be)
    together = llm.generate(prompts, params)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert max(be.calls) == len(prompts)  # one forward call carried every running request
    assert be.kv == {} and be.model.kv_bytes_used() == 0  # every cache freed


@pytest.mark.parametrize("shift", [True, False])
def test_stop_token_truncates(models, shift):
    m = models[shift]
    meta = m.meta
    prompt = prompt_ids(BS - 2, seed=3)
    full = _ref(m, prompt, max_tokens=20, threshold=0.9, stop_ids=[])
    stop = full[9]
    first = full.index(stop)
    want = _ref(m, prompt, max_tokens=20, threshold=0.9, stop_ids=[stop])
    assert want == full[:first + 1]
    got = LLM(backend(m)).generate(
        prompt, SamplingParams(max_tokens=20, threshold=0.9, stop_token_ids=[stop], ignore_eos=True))[0]
    assert got.token_ids == want
    assert got.finish_reason == "stop"


def test_max_tokens_exact_and_prefix(models):
    m = models[True]
    meta = m.meta
    prompt = prompt_ids(5, seed=4)
    llm = LLM(backend(m))
    long = llm.generate(prompt, SamplingParams(max_tokens=20, threshold=0.9, ignore_eos=True))[0]
    for n in (1, 3, 8, 11):
        g = llm.generate(prompt, SamplingParams(max_tokens=n, threshold=0.9, ignore_eos=True))[0]
        assert g.token_ids == long.token_ids[:n]
        assert g.finish_reason == "length"


def test_context_limit(models):
    m = models[True]
    meta = m.meta
    L = meta["max_position_embeddings"]
    prompt = prompt_ids(L - 5, seed=6)
    g = LLM(backend(m)).generate(prompt, SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(g.token_ids) == 5 and g.finish_reason == "length"


def test_chunked_prefill(models):
    m = models[True]
    prompt = prompt_ids(4 * BS + 3, seed=14)
    want = _ref(m, prompt, max_tokens=10, threshold=0.9)
    be = backend(m)
    llm = LLM(be)
    llm.engine.prefill_chunk = 2 * BS  # the prompt's 4 whole blocks take two forward calls
    got = llm.generate(prompt, SamplingParams(max_tokens=10, threshold=0.9))[0]
    assert got.token_ids == want
    assert be.token_counts[:2] == [2 * BS, 2 * BS]


@pytest.mark.parametrize("use_block_cache", [False, True])
def test_partial_last_block(models, use_block_cache):
    # a context that is not a multiple of the block size: the last block is cut short
    m = models[True]
    L = m.meta["max_position_embeddings"] - 5
    prompt = prompt_ids(L - 12, seed=15)
    want = _ref(m, prompt, max_tokens=50, threshold=0.9, stop_ids=[], max_len=L, use_block_cache=use_block_cache)
    assert len(want) == 12
    got = LLM(backend(m, max_position_embeddings=L)).generate(
        prompt, SamplingParams(max_tokens=50, threshold=0.9, ignore_eos=True, use_block_cache=use_block_cache))[0]
    assert got.token_ids == want and got.finish_reason == "length"


def test_stop_strings(models):
    m = models[True]
    meta = m.meta
    prompt = prompt_ids(6, seed=8)
    llm = LLM(backend(m))
    full = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = full.text
    # a stop string of real characters (random byte tokens also decode to U+FFFD)
    starts = [i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
    assert starts, text
    stop = text[starts[0]:starts[0] + 2]
    cut = text.index(stop)
    g = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=["\x00never", stop]))[0]
    assert g.text == text[:cut]
    assert g.finish_reason == "stop"
    assert full.token_ids[:len(g.token_ids)] == g.token_ids
    # the kept tokens are exactly those needed to see the stop string
    tok = llm.tokenizer
    assert stop in tok.decode(g.token_ids) and stop not in tok.decode(g.token_ids[:-1])
    # streaming never leaks the stop string
    deltas = list(llm.generate_stream(prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=stop)))
    assert "".join(deltas) == text[:cut]


def test_streaming_matches_generate(models):
    m = models[True]
    meta = m.meta
    prompt = prompt_ids(3, seed=9)
    llm = LLM(backend(m))
    sp = SamplingParams(max_tokens=24, threshold=0.9, ignore_eos=True)
    g = llm.generate(prompt, sp)[0]
    deltas = list(llm.generate_stream(prompt, sp))
    assert "".join(deltas) == g.text
    assert len([d for d in deltas if d]) > 2  # text arrives while the request runs
    assert llm.last.token_ids == g.token_ids


def test_seeded_sampling(models):
    m = models[True]
    meta = m.meta
    prompts = [prompt_ids(4, seed=11), prompt_ids(9, seed=12)]
    sp = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed,  # noqa: E731
                                     threshold=0.9, ignore_eos=True)
    llm = LLM(backend(m))
    a = llm.generate(prompts, [sp(7), sp(8)])
    b = llm.generate(prompts, [sp(7), sp(8)])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    alone = llm.generate(prompts[1], sp(8))[0]
    assert alone.token_ids == a[1].token_ids  # independent of the batch
    c = llm.generate(prompts[0], sp(9))[0]
    greedy = llm.generate(prompts[0], SamplingParams(max_tokens=16, threshold=0.9, ignore_eos=True))[0]
    assert c.token_ids != a[0].token_ids or a[0].token_ids != greedy.token_ids


def test_block_size_one_is_autoregressive(models):
    m = models[True]
    meta = m.meta
    prompt = prompt_ids(6, seed=13)
    n = 12
    eng_llm = LLM(backend(m), block_size=1)
    got = eng_llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))[0]
    with torch.no_grad():
        want = m.hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           suppress_tokens=[meta["mask_token_id"]], pad_token_id=0)[0, len(prompt):].tolist()
    assert got.token_ids == want
    assert got.stats["forwards"] == n
    ref = _ref(m, prompt, max_tokens=n, threshold=1.0, block_size=1, sbs=1, stop_ids=[])
    assert ref == want  # the reference decoder itself reduces to AR decoding


def test_caches_freed_and_abort(models):
    m = models[True]
    meta = m.meta
    be = backend(m)
    eng = Engine(be, tokenizer=be.tokenizer)
    eng.add_request("a", prompt_ids(5, seed=1), SamplingParams(max_tokens=30, ignore_eos=True))
    eng.add_request("b", prompt_ids(6, seed=2), SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    assert len(be.kv) == 2 and eng.num_running() == 2
    eng.abort("a")
    assert len(be.kv) == 1
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    fin = {o.request_id: o for o in outs if o.finished}
    assert fin["a"].finish_reason == "abort" and fin["b"].finish_reason == "length"
    assert fin["b"].num_generated_tokens == 3
    assert be.kv == {} and be.model.kv_bytes_used() == 0
    eng.abort("unknown")  # no-op


def test_max_batch_queues(models):
    m = models[True]
    meta = m.meta
    be = backend(m)
    llm = LLM(be, max_batch=2)
    prompts = [prompt_ids(3 + i, seed=20 + i) for i in range(4)]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    got = llm.generate(prompts, sp)
    assert max(be.calls) == 2
    assert [g.token_ids for g in got] == [LLM(backend(m)).generate(p, sp)[0].token_ids for p in prompts]


def test_bad_input(models, tok_json):
    m = models[True]
    meta = m.meta
    be = backend(m)
    llm = LLM(be)
    eng = llm.engine
    L = meta["max_position_embeddings"]
    bad = [
        ([[]], SamplingParams()),
        ("", SamplingParams()),
        (prompt_ids(L, seed=0), SamplingParams()),
        (prompt_ids(L + 3, seed=0), SamplingParams()),
        ([5, 6], SamplingParams(max_tokens=0)),
        ([5, 6], SamplingParams(max_tokens=-3)),
        ([5, 6], SamplingParams(threshold=0.0)),
        ([5, 6], SamplingParams(threshold=1.5)),
        ([5, 6], SamplingParams(small_block_size=3)),
        ([5, 6], SamplingParams(temperature=-1.0)),
        ([5, 6], SamplingParams(top_p=0.0)),
        ([5, 6], SamplingParams(stop=[""])),
        ([5, meta["mask_token_id"]], SamplingParams()),
        ([5, 10 ** 6], SamplingParams()),
        ([5, -1], SamplingParams()),
    ]
    for prompt, sp in bad:
        with pytest.raises(ValueError):
            llm.generate(prompt, sp)
        assert not eng.has_unfinished() and be.kv == {}
    # a batch with one bad prompt: nothing of it is queued
    with pytest.raises(ValueError):
        llm.generate([[5, 6], []], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished() and be.kv == {}
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("y", [], SamplingParams())
    eng.add_request("x", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        eng.add_request("x", [7, 8], SamplingParams(max_tokens=2))
    eng.abort("x")
    eng.step()
    # diffusion on a model without a mask token
    with pytest.raises(ValueError, match="mask"):
        LLM(backend(m, mask_token_id=None))
    LLM(backend(m, mask_token_id=None), block_size=1)  # autoregressive is fine
    with pytest.raises(FileNotFoundError):
        LLM("/nonexistent/model.bin")


# ------------------------------------------------------------- tokenizer
def test_incremental_detokenizer_utf8(tok_json):
    tok = Tokenizer(tok_json)
    text = "héllo wörld 日本語 テキスト the fox"
    ids = tok.encode(text)
    d = tok.detokenizer([])
    deltas = [d.add(t) for t in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in x for x in deltas)
    # byte-level tokens split multibyte characters: some deltas must have been held back
    assert any(x == "" for x in deltas[:-1])


def test_chat_template_matches_transformers(tok_json, models):
    from transformers import PreTrainedTokenizerFast


    tmpl = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('need system') }}{% endif %}"
            "{{ bos_token }}{% for m in messages %}{% if loop.index0 > 5 %}{% break %}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}{{ {'a': 'é'} | tojson }}")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_json)._tok, bos_token="<|im_start|>",
                                     eos_token="<|im_end|>")
    hf_tok.chat_template = tmpl
    ours = Tokenizer(tok_json, chat_template=tmpl, bos_token_id=2, eos_token_ids=[3])
    msgs = [{"role": "system", "content": "be brief "}, {"role": "user", "content": "hello wörld"}]
    for agp in (True, False):
        assert ours.apply_chat_template(msgs, add_generation_prompt=agp) == \
            hf_tok.apply_chat_template(msgs, add_generation_prompt=agp, tokenize=False)
    ids = ours.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == 2
    with pytest.raises(Exception, match="need system"):
        ours.apply_chat_template(msgs[1:])


# ------------------------------------------------------------------- CLI
def _cli(*args):
    import subprocess
    import sys

    code = ("import sys; from bitdlm.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'the runtime path imported torch'; sys.exit(rc)")
    from hf_models import child_env

    env = child_env()
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_cli_generate(models):
    import bitdlm

    m = models[True]
    llm = LLM(bitdlm.load(str(m.path)))
    want = llm.generate("hello world", SamplingParams(max_tokens=10, threshold=0.9, ignore_eos=True))[0]
    r = _cli("generate", "hello world", "--model", m.path, "--max-tokens", 10, "--threshold", 0.9,
             "--ignore-eos", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    assert "forwards: " in r.stderr and "tokens/forward: " in r.stderr and "tok/s: " in r.stderr
    r2 = _cli("generate", "hello world", "--model", m.path, "--max-tokens", 10, "--threshold", 0.9,
              "--ignore-eos", "--stream")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout
    chat_ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert llm.tokenizer.decode(chat_ids, skip_special_tokens=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    want = llm.generate(chat_ids, SamplingParams(max_tokens=6))[0]
    r3 = _cli("generate", "hi", "--chat", "--model", m.path, "--max-tokens", 6)
    assert r3.returncode == 0, r3.stderr
    assert r3.stdout == want.text + "\n"
    for bad in (["--max-tokens", 0], ["--threshold", 1.5], ["--small-block-size", 3]):
        r = _cli("generate", "hello", "--model", m.path, *bad)
        assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr)
    r = _cli("generate", "", "--model", m.path)
    assert r.returncode == 2 and "empty prompt" in r.stderr
    r = _cli("generate", "hello", "--model", "/nonexistent.bin")
    assert r.returncode == 2 and "not found" in r.stderr


def test_default_model(models, monkeypatch):
    import bitdlm.model

    monkeypatch.setattr(bitdlm.model, "default_model_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="default model"):
        LLM()
    monkeypatch.setattr(bitdlm.model, "default_model_path", lambda: str(models[True].path))
    g = LLM(threads=1).generate("hello", SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(g.token_ids) == 3
