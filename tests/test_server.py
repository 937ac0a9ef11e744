"""The OpenAI-compatible server, driven over loopback HTTP with the official
`openai` client (and httpx for the malformed requests a client cannot send).

`server` is the real thing: `python -m bitdlm.cli serve` in a subprocess on a
tiny converted model. `fake_server` runs the same app in-process on a
scripted engine, for what a real engine cannot be made to do on demand
(slow steps to fill the queue, a step that raises)."""
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
KEY = "sk-test-bitdlm"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=15.0, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return pred()


def client_for(base, key=KEY, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(trust_env=False), **kw)


def http(base, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=60, trust_env=False)


def metric(base, name, labels=""):
    """Value of one Prometheus sample (0.0 when absent)."""
    text = http(base).get("/metrics").text
    pat = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)$"
    m = re.search("^" + pat, text, re.M)
    return float(m.group(1)) if m else 0.0


# ------------------------------------------------------------- fake engine


class FakeEngine:
    """Scripted engine: request r emits `tps` tokens per step (letters derived
    from its prompt), each step sleeps `delay`; prompt token 1 makes a step
    raise, token 2 makes add_request raise ValueError."""

    def __init__(self, delay=0.0, tps=2, max_batch=2):
        self.reqs, self.delay, self.tps, self.max_batch = {}, delay, tps, max_batch
        self.aborted = []

    def add_request(self, rid, prompt_ids, params):
        if 2 in prompt_ids:
            raise ValueError("token 2 is not allowed here")
        self.reqs[rid] = {"p": list(prompt_ids), "max": params.max_tokens, "gen": [], "fw": 0}

    def abort(self, rid):
        if self.reqs.pop(rid, None) is not None:
            self.aborted.append(rid)

    def has_unfinished(self):
        return bool(self.reqs)

    def num_running(self):
        return min(len(self.reqs), self.max_batch)

    def step(self):
        from types import SimpleNamespace

        time.sleep(self.delay)
        outs = []
        for rid, r in list(self.reqs.items())[: self.max_batch]:
            if 1 in r["p"]:
                raise RuntimeError("step exploded")
            r["fw"] += 1
            new = [97 + (sum(r["p"]) + len(r["gen"]) + k) % 26
                   for k in range(min(self.tps, r["max"] - len(r["gen"])))]
            r["gen"] += new
            fin = len(r["gen"]) >= r["max"]
            outs.append(SimpleNamespace(
                request_id=rid, new_token_ids=new, text=bytes(new).decode(), finished=fin,
                finish_reason="length" if fin else None, num_prompt_tokens=len(r["p"]),
                num_generated_tokens=len(r["gen"]), forwards=r["fw"]))
            if fin:
                del self.reqs[rid]
        return outs


class ByteTokenizer:
    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt=True):
        s = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return s + ("<assistant>" if add_generation_prompt else "")


class ThreadServer:
    """uvicorn serving `app` on a free loopback port in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert wait_until(lambda: self.server.started, 15), "in-process server did not start"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def fake_server():
    """Factory: fake_server(delay=..., max_batch=..., max_queue=...) -> ThreadServer."""
    from bitdlm.server import ServerConfig, create_app

    started = []

    def make(delay=0.0, max_batch=2, max_queue=4, tps=2):
        engine = FakeEngine(delay=delay, tps=tps, max_batch=max_batch)
        cfg = ServerConfig(served_model_name="fake", max_model_len=256, vocab_size=256,
                           max_batch=max_batch, max_queue=max_queue, api_key=KEY)
        srv = ThreadServer(create_app(engine, ByteTokenizer(), cfg)).__enter__()
        srv.engine = engine
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.__exit__()


# ---------------------------------------------------- fake-engine tests


def test_queue_full_is_429_and_admission_resumes(fake_server):
    srv = fake_server(delay=0.05, max_batch=1, max_queue=1)
    c = client_for(srv.base)
    # two long requests fill the batch slot and the queue slot
    streams = [c.completions.create(model="fake", prompt="abc", max_tokens=200, stream=True)
               for _ in range(2)]
    first = next(iter(streams[0]))
    assert first.choices[0].text
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model="fake", prompt="abc", max_tokens=4)
    assert ei.value.status_code == 429
    assert ei.value.body["code"] == "queue_full"
    for s in streams:
        s.close()
    # the aborted requests free their slots: admission works again
    assert wait_until(lambda: metric(srv.base, "bitdlm_requests_running") == 0
                      and metric(srv.base, "bitdlm_requests_queued") == 0)
    r = c.completions.create(model="fake", prompt="abc", max_tokens=4)
    assert len(r.choices[0].text) == 4
    assert len(srv.engine.aborted) == 2


def test_engine_errors_fail_only_their_request(fake_server):
    srv = fake_server(delay=0.0)
    c = client_for(srv.base)
    # add_request's ValueError -> 400 before any stream starts
    with pytest.raises(openai.BadRequestError, match="token 2 is not allowed"):
        c.completions.create(model="fake", prompt=[5, 2], max_tokens=4, stream=True)
    # a step that raises -> 500 for that request, the server keeps serving
    with pytest.raises(openai.InternalServerError, match="step exploded"):
        c.completions.create(model="fake", prompt=[5, 1], max_tokens=4)
    stream = c.completions.create(model="fake", prompt=[1, 5], max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="step exploded"):
        list(stream)
    r = c.completions.create(model="fake", prompt="ok", max_tokens=3)
    assert len(r.choices[0].text) == 3
    assert metric(srv.base, "bitdlm_requests_finished_total", 'reason="error"') == 2
    assert metric(srv.base, "bitdlm_requests_finished_total", 'reason="rejected"') == 1


def test_finished_request_leaves_without_stalling_others(fake_server):
    srv = fake_server(delay=0.01, max_batch=4, max_queue=4)
    c = client_for(srv.base)
    long = c.completions.create(model="fake", prompt="x", max_tokens=120, stream=True)
    it = iter(long)
    next(it)
    t0 = time.monotonic()
    short = c.completions.create(model="fake", prompt="y", max_tokens=4)
    assert len(short.choices[0].text) == 4
    assert time.monotonic() - t0 < 1.0  # did not wait for the long one (~0.6 s)
    rest = "".join(ch.choices[0].text for ch in it if ch.choices)
    assert len(rest) == 120 - 2


def test_batch_prompts_give_indexed_choices(fake_server):
    srv = fake_server()
    c = client_for(srv.base)
    r = c.completions.create(model="fake", prompt=["ab", "cd", "ef"], max_tokens=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    solo = [c.completions.create(model="fake", prompt=p, max_tokens=3).choices[0].text
            for p in ("ab", "cd", "ef")]
    assert [ch.text for ch in r.choices] == solo
    assert r.usage.completion_tokens == 9 and r.usage.prompt_tokens == 6
