"""Hostile and clumsy input (issue 24): each test fails on the code before the
fix it names, and bounds its own time."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from hf_models import child_env  # noqa: E402


@pytest.fixture(scope="module")
def packaged_tokenizer():
    from bitdlm.data import default_model_path
    from bitdlm.format import ModelFile
    from bitdlm.tokenizer import Tokenizer

    return Tokenizer.from_meta(ModelFile.open(default_model_path()).meta)


def run_cli(*args, timeout=60, **env):
    return subprocess.run([sys.executable, "-m", "bitdlm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(**env))


# ---------------------------------------------------------------- item 4: chat templates

HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "huge repeat": "{{ 'x' * 10**10 }}",
    "doubling": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "adding": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
              "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "squaring filter": "{% set ns = namespace(s='xxxx') %}{% for i in range(9) %}"
                       "{% set ns.s = ns.s|replace('', ns.s) %}{% endfor %}",
    "squaring method": "{% set ns = namespace(s='xxxx') %}{% for i in range(9) %}"
                       "{% set ns.s = ns.s.replace('', ns.s) %}{% endfor %}",
    "wide format": "{{ '{:>9999999999}'.format(1) }}",
    "wide printf": "{{ '%9999999999d' % 1 }}",
    "wide format filter": "{{ '%9999999999d'|format(1) }}",
    "wide center": "{{ 'x'|center(10**10) }}",
    "wide ljust": "{{ 'x'.ljust(10**10) }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_stops_with_a_clear_error(packaged_tokenizer, name):
    from bitdlm.tokenizer import RENDER_SECONDS, ChatTemplateLimitError

    msgs = [{"role": "user", "content": "hi"}]
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="chat template"):
        packaged_tokenizer.apply_chat_template(msgs, chat_template=HOSTILE_TEMPLATES[name])
    assert time.monotonic() - t0 < RENDER_SECONDS + 3


def test_bounded_rendering_renders_like_plain_jinja(packaged_tokenizer):
    """The bounds change nothing for a real template: same text as jinja's own
    sandbox (what transformers uses), filters, methods and operators included."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    extra = ("{{ range(10)|join(',') }} {{ 'a b'|upper|replace('A', 'x') }} {{ messages|length }}"
             " {{ '%s-%d' % ('a', 3) }} {{ 'x' * 3 }} {{ 2 ** 10 }} {{ 'ab'.replace('a', 'c') }}"
             " {{ '{:>4}'.format(7) }} {{ 'y'|center(5) }}|{{ messages[0].content ~ '!' }}")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"},
            {"role": "assistant", "content": "return x"}, {"role": "user", "content": "more"}]
    for template in (packaged_tokenizer.chat_template, extra):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        want = env.from_string(template).render(messages=msgs, add_generation_prompt=True,
                                                bos_token=packaged_tokenizer.bos_token or "",
                                                eos_token=packaged_tokenizer.eos_token or "")
        assert packaged_tokenizer.apply_chat_template(msgs, chat_template=template) == want
    # a trace function installed by someone else (coverage, a debugger) is put back
    seen = []

    def tracer(frame, event, arg):
        seen.append(event)

    sys.settrace(tracer)
    try:
        packaged_tokenizer.apply_chat_template(msgs)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


# ---------------------------------------------------------------- item 6: thread counts


@pytest.mark.parametrize("threads", [0, -1, 513, 10 ** 4, 10 ** 6])
def test_absurd_thread_counts_are_refused_by_the_api(threads):
    import bitdlm
    from bitdlm import _core
    from bitdlm.data import default_model_path

    with pytest.raises(ValueError, match=r"threads must be in \[1, 512\]"):
        bitdlm.LLM(threads=threads)
    with pytest.raises(TypeError, match="threads must be an integer"):
        bitdlm.load(default_model_path(), threads=2.5)
    # the core's own guard, for callers that go around the Python check
    m = bitdlm.load(default_model_path(), threads=1)
    if threads > 512:
        with pytest.raises((ValueError, TypeError), match="threads must be <= 512"):
            m._core.threads = threads
    assert isinstance(_core.get_max_threads(), int)


def test_omp_num_threads_past_the_cap_still_runs_a_request():
    """OMP_NUM_THREADS=100000 used to reach libgomp (SIGSEGV on the first forward)."""
    out = run_cli("generate", "def f(", "--max-tokens", "4", "--block-size", "1",
                  OMP_NUM_THREADS="100000")
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("cmd", [["generate", "x", "--threads"], ["serve", "--threads"],
                                 ["bench", "threads", "--model", "m.bin", "--threads"]])
def test_absurd_thread_counts_are_a_usage_error_in_the_cli(cmd):
    out = run_cli(*cmd, "100000", timeout=30)
    assert out.returncode == 2
    assert "512" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- items 10-15: the server

@pytest.fixture(scope="module")
def packaged_server(tmp_path_factory):
    """`bitdlm serve` on the packaged model, no API key (the case DNS rebinding
    and cross-site POSTs are about), a 1 s header timeout."""
    from server_helpers import running_server

    with running_server(None, tmp_path_factory.mktemp("harden_log") / "server.log", cmd=[
            sys.executable, "-m", "bitdlm.cli", "serve", "--host", "127.0.0.1", "--threads", "1",
            "--header-timeout", "1", "--shutdown-timeout", "0.5", "--log-level", "warning"]) as srv:
        yield srv


def _health_ms(base):
    import httpx

    t0 = time.monotonic()
    r = httpx.get(base + "/health", timeout=10, trust_env=False)
    assert r.status_code == 200
    return (time.monotonic() - t0) * 1000


def test_slowloris_connections_are_closed_and_health_stays_up(packaged_server):
    import socket

    port = int(packaged_server.base.rsplit(":", 1)[1])
    socks = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
        socks.append(s)
    quiet = socket.create_connection(("127.0.0.1", port), timeout=5)  # sends nothing at all
    t_end = time.monotonic() + 3.0
    while time.monotonic() < t_end:  # trickle one header byte per socket every 0.2 s
        for s in socks:
            try:
                s.sendall(b"a")
            except OSError:
                pass
        assert _health_ms(packaged_server.base) < 2000
        time.sleep(0.2)
    closed = 0
    for s in socks + [quiet]:
        s.settimeout(2)
        try:
            closed += s.recv(100) == b""
        except OSError:
            closed += 1
        s.close()
    assert closed == len(socks) + 1  # every one timed out after 1 s, though it kept sending


def test_browser_simple_posts_and_rebound_hosts_are_refused(packaged_server):
    import httpx

    base = packaged_server.base
    body = '{"prompt": "def f(", "max_tokens": 2}'
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as c:
        for ctype in (None, "text/plain", "text/plain;charset=UTF-8",
                      "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            headers = {"Content-Type": ctype} if ctype else {}
            r = c.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 415, (ctype, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
        ok = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
            r = c.get("/v1/models", headers={"Host": host})
            assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host", host
        for host in ("localhost", "localhost:1234", "127.0.0.1", "[::1]:80", "api.localhost"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("port,match", [("89536", "--port must be in"), ("0", "--port must be in"),
                                        ("-1", "--port must be in"), ("INUSE", "cannot listen on")])
def test_bad_or_busy_port_is_a_one_line_setup_error(port, match):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        if port == "INUSE":
            port = str(busy.getsockname()[1])
        out = run_cli("serve", "--host", "127.0.0.1", "--port", port, "--threads", "1", timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert match in out.stderr and "Traceback" not in out.stderr


def test_sighup_drains_like_sigterm(tmp_path):
    """SIGHUP used to kill the server at once: streams cut with no error event."""
    import json
    import signal

    import httpx
    from server_helpers import running_server

    with running_server(None, tmp_path / "server.log", cmd=[
            sys.executable, "-m", "bitdlm.cli", "serve", "--host", "127.0.0.1", "--threads", "1",
            "--shutdown-timeout", "0.3", "--log-level", "warning"]) as srv:
        body = {"prompt": "def f(", "max_tokens": 1900, "ignore_eos": True, "stream": True,
                "block_length": 1}
        with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=60,
                          trust_env=False) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: "))
            assert "choices" in first
            srv.proc.send_signal(signal.SIGHUP)
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "unavailable"
        assert srv.proc.wait(30) == 0


# ---------------------------------------------------------------- items 1-3: model files

def _copy_packaged(dst):
    import shutil

    from bitdlm.data import default_model_path

    shutil.copyfile(default_model_path(), dst)
    return dst


def _rewrite(src, dst, change=None, **meta):
    """dst: src's tensors written anew by ModelWriter (valid header and crcs),
    `change(name, array)` -> array applied first, `meta` keys replaced."""
    from bitdlm.format import ModelFile, ModelWriter

    with ModelFile.open(src) as mf:
        specs = {t.name: (t.dtype, list(t.shape)) for t in mf.tensors.values()}
        with ModelWriter(dst, {**mf.meta, **meta}, specs, overwrite=True) as w:
            for t in mf.tensors.values():
                a = mf.array(t.name).copy()
                w.write(t.name, change(t.name, a) if change else a, scale=t.scale)
            w.commit()
    return dst


def test_corrupt_or_non_finite_tensor_data_is_refused_at_load(tmp_path):
    import numpy as np

    import bitdlm
    from bitdlm.format import ModelFile, ModelFormatError

    path = _copy_packaged(tmp_path / "flip.bin")
    with ModelFile.open(path) as mf:
        t = mf.tensors["model.norm.weight"]
    with open(path, "r+b") as f:  # one flipped bit in a norm: only the crc tells
        f.seek(t.offset + 5)
        b = f.read(1)
        f.seek(t.offset + 5)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(ModelFormatError, match="corrupted"):
        bitdlm.load(path, verify=True)

    def poison(name, a):
        if name == "model.norm.weight":
            a[3] = np.nan
        if name == "model.embed_tokens.weight":
            a[7, 1] = np.inf
        return a

    nan = _rewrite(_copy_packaged(tmp_path / "src.bin"), tmp_path / "nan.bin", poison)
    with pytest.raises(ModelFormatError, match="NaN or Inf"):
        bitdlm.load(nan, verify=True)
    from server_helpers import free_port

    for bad, what in ((path, "corrupted"), (nan, "NaN or Inf")):
        out = run_cli("serve", "--model", str(bad), "--port", str(free_port()), "--threads", "1")
        assert out.returncode == 2 and what in out.stderr, out.stderr[-2000:]


def test_a_fifo_as_model_is_refused_at_once(tmp_path):
    import bitdlm
    from bitdlm.format import ModelFormatError

    fifo = tmp_path / "model.bin"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        bitdlm.load(fifo)
    for args in (["info", str(fifo)], ["generate", "x", "--model", str(fifo)],
                 ["serve", "--model", str(fifo), "--threads", "1"]):
        out = run_cli(*args, timeout=30)  # used to hang for ever on open(2)
        assert out.returncode == 2 and "not a regular file" in out.stderr, (args, out.stderr)


def test_model_file_rewritten_under_the_server_stops_it_cleanly(tmp_path):
    """cp over the served file: it used to keep answering with the new weights
    (same size) or die of SIGBUS (truncated), streams cut without an error."""
    import json

    import httpx
    from server_helpers import running_server

    model = _copy_packaged(tmp_path / "served.bin")
    other = _rewrite(model, tmp_path / "other.bin", lambda n, a: a[::-1].copy()
                     if n == "model.norm.weight" else a)
    with running_server(None, tmp_path / "server.log", cmd=[
            sys.executable, "-m", "bitdlm.cli", "serve", "--model", str(model), "--host",
            "127.0.0.1", "--threads", "1", "--log-level", "warning"]) as srv:
        body = {"prompt": "def f(", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=60,
                          trust_env=False) as r:
            lines = r.iter_lines()
            assert "choices" in next(x for x in lines if x.startswith("data: "))
            with open(model, "r+b") as f:  # what cp does to an existing file of the same size
                f.write(other.read_bytes())
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "unavailable"
        assert srv.proc.wait(30) == 3
        assert "modified in place" in srv.log.read_text()


# ---------------------------------------------------------------- items 7-9: the converter

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from hf_models import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("harden_hf") / "hf")


def test_convert_never_overwrites_its_input_or_a_special_file(hf_checkpoint, tmp_path):
    import stat

    st = hf_checkpoint / "model.safetensors"
    before = st.read_bytes()
    out = run_cli("convert", str(hf_checkpoint), str(st), "--force", "--quiet")
    assert out.returncode == 2 and "refusing to overwrite the input" in out.stderr, out.stderr
    assert st.read_bytes() == before
    fifo = tmp_path / "out.bin"  # stands for /dev/full: any node that is not a regular file
    os.mkfifo(fifo)
    out = run_cli("convert", str(hf_checkpoint), str(fifo), "--force", "--quiet")
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["out.bin"]  # no temporary file left


def test_a_second_writer_to_the_same_new_output_fails_instead_of_winning(tmp_path):
    """Two converts to one new output without --force: both exited 0 and the
    later silently replaced the earlier."""
    from bitdlm.data import default_model_path
    from bitdlm.format import ModelFile, ModelWriter

    out = tmp_path / "m.bin"
    with ModelFile.open(default_model_path()) as mf:
        specs = {t.name: (t.dtype, list(t.shape)) for t in mf.tensors.values()}
        with pytest.raises(FileExistsError, match="created by someone else"):
            with ModelWriter(out, mf.meta, specs) as w:
                for t in mf.tensors.values():
                    w.write(t.name, mf.array(t.name), scale=t.scale)
                out.write_bytes(b"the other convert's output")  # it finished first
                w.commit()
    assert out.read_bytes() == b"the other convert's output"
    assert os.listdir(tmp_path) == ["m.bin"]


def test_safetensors_with_overlapping_tensors_are_refused(tmp_path):
    import json
    import struct

    from bitdlm.convert.checkpoint import SafetensorsFile
    from bitdlm.convert.common import ConversionError

    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(24))
    with pytest.raises(ConversionError, match="overlap"):
        SafetensorsFile(p)
    header["b"]["data_offsets"] = [16, 32]  # adjacent is fine
    raw = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    SafetensorsFile(p).close()


# ---------------------------------------------------------------- items 20-22: a new user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_docs_say_what_works_from_a_checkout(packaged_server):
    import re

    from bitdlm.data import default_model_path
    from bitdlm.format import ModelFile

    for rel in ("README.md", "docs/scaling.md", "docs/server.md", "python/bitdlm/ray.py"):
        assert 'install "bitdlm[' not in _read(rel), rel  # bitdlm is not on PyPI: ".[ray]"
    readme = _read("README.md")
    apt = next(x for x in readme.splitlines() if "apt-get install" in x)
    assert "libsimde-dev" in apt  # else the AVX-512 checks under SIMDe skip quietly
    meta = ModelFile.open(default_model_path()).meta
    m = re.search(r"the packaged model's are block (\d+), sub-block (\d+), threshold ([\d.]+)", readme)
    d = meta["diffusion"]
    assert m and (int(m[1]), int(m[2]), float(m[3])) == (d["block_size"], d["small_block_size"],
                                                         d["threshold"])
    # docs/server.md's Python example, as written, against `bitdlm serve` of the packaged model
    code = re.search(r"```python\n(from openai import OpenAI.*?)```", _read("docs/server.md"), re.S)[1]
    code = code.replace("http://127.0.0.1:8000", packaged_server.base)
    exec(compile(code, "docs/server.md", "exec"), {"print": lambda *a, **k: None})


def test_info_and_bench_threads_default_to_the_packaged_model(tmp_path):
    out = run_cli("info", "--summary")
    assert out.returncode == 0 and "tiny-bitdlm" in out.stdout, out.stderr
    out = run_cli("bench", "threads", "--threads", "1", "--reps", "1", "--warmup", "0",
                  "--prompt", "8", "--json", str(tmp_path / "t.json"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny-bitdlm" in (tmp_path / "t.json").read_text()


# ---------------------------------------------------------------- items 5, 17-19: the Python API

@pytest.fixture(scope="module")
def llm():
    import bitdlm

    return bitdlm.LLM(threads=1)


def test_one_llm_shared_by_8_threads_gives_solo_results(llm):
    """81 of 90 calls raised (IndexError, KeyError) and 3 returned wrong text."""
    import threading

    import bitdlm

    prompts = ["def f(", "import os", "class A"]
    sp = bitdlm.SamplingParams(max_tokens=6, block_length=1)
    solo = [g.text for g in llm.generate(prompts, sp)]
    errors, got = [], []

    def worker(i):
        try:
            for j in range(3):
                got.append((j, llm.generate(prompts[(i + j) % 3], sp)[0].text, (i + j) % 3))
        except Exception as e:  # noqa: BLE001 (any failure is the bug)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 24
    assert all(text == solo[k] for _j, text, k in got)
    # interleaving a stream with another call in one thread would steal its outputs: refused
    stream = llm.generate_stream("def f(", sp)
    next(stream)
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        llm.generate("x", sp)
    stream.close()
    assert llm.generate("def f(", sp)[0].text == solo[0]


def test_admission_is_linear_and_windowed(llm, monkeypatch):
    """generate() of 10^6 prompts never started: each add scanned the waiting queue."""
    from types import SimpleNamespace

    import bitdlm
    from bitdlm.engine.scheduler import Scheduler

    sched = Scheduler(None, 1, None, 10, None)
    t0 = time.monotonic()
    for i in range(100_000):
        rid = f"r{i}"
        assert not sched.has(rid)
        sched.add(SimpleNamespace(rid=rid, seq_id=-1))
    for i in range(0, 100_000, 2):
        sched.remove(f"r{i}")
    assert len(sched.waiting) == 50_000 and time.monotonic() - t0 < 20  # was ~an hour
    # LLM.generate feeds the engine a window at a time: the first step runs at once
    eng = llm.engine
    most = []
    real_step = eng.step

    def step():
        most.append(eng.num_waiting() + eng.num_running())
        return real_step()

    monkeypatch.setattr(eng, "step", step)
    n = 200
    out = llm.generate([[5 + i % 50, 7] for i in range(n)], bitdlm.SamplingParams(max_tokens=1))
    assert len(out) == n and all(g.finish_reason in ("length", "stop") for g in out)
    assert max(most) <= max(4 * eng.max_batch, 64) < n


@pytest.mark.parametrize("call,exc,match", [
    (lambda b, llm: b.LLM(123), TypeError, "takes a .bin path"),
    (lambda b, llm: b.LLM(b"m.bin"), TypeError, "takes a .bin path"),
    (lambda b, llm: b.LLM(threads="4"), TypeError, "threads must be an integer"),
    (lambda b, llm: llm.generate([10 ** 30]), ValueError, "token ids"),
    (lambda b, llm: llm.generate([[5, 6], [7, -1]]), ValueError, r"\[0, "),
    (lambda b, llm: llm.generate("x", "greedy"), TypeError, "params must be SamplingParams"),
    (lambda b, llm: b.SamplingParams(skip_special_tokens="no").validate(), ValueError, "skip_special_tokens"),
    (lambda b, llm: b.SamplingParams(ignore_eos=1).validate(), ValueError, "ignore_eos"),
    (lambda b, llm: b.SamplingParams(stop_token_ids=7).validate(), ValueError, "stop_token_ids"),
    (lambda b, llm: b.SamplingParams(stop_token_ids=[2 ** 40]).validate(), ValueError, "stop_token_ids"),
    (lambda b, llm: b.SamplingParams(block_length=2048).validate(), ValueError, "block_length"),
    (lambda b, llm: llm.generate("x", b.SamplingParams(block_length=256, small_block_size=1)),
     ValueError, "sub-blocks"),
])
def test_wrong_argument_types_and_values_are_clear_errors(llm, call, exc, match):
    import bitdlm

    with pytest.raises(exc, match=match):
        call(bitdlm, llm)
    assert llm.engine.num_waiting() + llm.engine.num_running() == 0  # nothing left queued


def test_the_largest_block_request_leaves_its_neighbour_usable(llm):
    """block_length 2048 + small_block_size 1 made a normal request beside it
    290x slower; the largest allowed one now costs a bounded factor."""
    import bitdlm

    normal = bitdlm.SamplingParams(max_tokens=8, ignore_eos=True)
    t0 = time.monotonic()
    llm.generate(["def f("], normal)
    alone = time.monotonic() - t0
    big = bitdlm.SamplingParams(max_tokens=4, ignore_eos=True, block_length=256, small_block_size=8)
    t0 = time.monotonic()
    out = llm.generate(["def f(", "def g("], [normal, big])
    both = time.monotonic() - t0
    assert [g.finish_reason for g in out] == ["length", "length"]
    assert both < 40 * alone + 5, (alone, both)


# ---------------------------------------------------------------- items 4, 11, 13 on the server

def _max_health_ms_while(base, work):
    """Run work() in a thread; the slowest /health answer meanwhile (ms) and work's result."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", work()))
    t.start()
    worst = 0.0
    while t.is_alive():
        worst = max(worst, _health_ms(base))
        time.sleep(0.02)
    t.join()
    return worst, box["r"]


def test_a_looping_chat_template_gets_400_while_the_server_answers(tmp_path):
    import httpx
    from server_helpers import running_server

    from bitdlm.tokenizer import RENDER_SECONDS

    model = _rewrite(_copy_packaged(tmp_path / "src.bin"), tmp_path / "loop.bin",
                     chat_template=HOSTILE_TEMPLATES["nested loops"])
    with running_server(None, tmp_path / "server.log", cmd=[
            sys.executable, "-m", "bitdlm.cli", "serve", "--model", str(model), "--host",
            "127.0.0.1", "--threads", "1", "--log-level", "warning"]) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

        def chat():
            return httpx.post(srv.base + "/v1/chat/completions", json=body, timeout=60,
                              trust_env=False)

        t0 = time.monotonic()
        worst, r = _max_health_ms_while(srv.base, chat)
        assert r.status_code == 400 and "ran longer than" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < RENDER_SECONDS + 10
        assert worst < 1000  # the render ran in the pool, not on the event loop
        ok = httpx.post(srv.base + "/v1/completions", json={"prompt": "def f(", "max_tokens": 2},
                        timeout=60, trust_env=False)
        assert ok.status_code == 200
        srv.proc.send_signal(__import__("signal").SIGTERM)  # stops at once (it did not)
        assert srv.proc.wait(30) == 0


def test_big_bodies_are_refused_or_parsed_without_stalling_the_loop(packaged_server):
    import httpx

    base = packaged_server.base
    with httpx.Client(base_url=base, timeout=120, trust_env=False) as c:
        huge = b'{"prompt": [' + b"5, " * (10 << 20) + b'5], "max_tokens": 1}'  # 30 MB
        r = c.post("/v1/completions", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413  # was parsed: /health stalled 2-7 s
        rows = ",".join(["[" + ", ".join(["5"] * 1000) + "]"] * 2200)  # 6.6 MB of token lists
        body = ('{"prompt": [' + rows + '], "max_tokens": 1}').encode()
        assert len(body) < 8 << 20

        def post():
            return c.post("/v1/completions", content=body,
                          headers={"Content-Type": "application/json"})

        worst, r = _max_health_ms_while(base, post)
        assert r.status_code == 429, r.text  # 2,200 prompts: more than the queue takes
        assert worst < 2000, worst


@pytest.mark.parametrize("route,payload", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "x", "max_tokens": 2, "stop": ["\\udbff"]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}'),
])
def test_lone_surrogates_are_a_400_not_a_500(packaged_server, route, payload):
    import httpx

    r = httpx.post(packaged_server.base + route, content=payload, timeout=60, trust_env=False,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    pair = httpx.post(packaged_server.base + "/v1/completions", timeout=60, trust_env=False,
                      content='{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}',
                      headers={"Content-Type": "application/json"})
    assert pair.status_code == 200, pair.text


# ---------------------------------------------------------------- item 16, 22: Ray

@pytest.mark.parametrize("address", ["127.0.0.1:PORT", "ray://127.0.0.1:PORT"])
def test_an_unreachable_ray_address_is_one_line_at_once(address):
    pytest.importorskip("ray")
    from server_helpers import free_port

    t0 = time.monotonic()
    out = run_cli("serve", "--replicas", "1", "--threads", "1", "--ray-address",
                  address.replace("PORT", str(free_port())), timeout=120, RAY_ADDRESS="")
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.strip() and "bitdlm.ray" not in x]
    assert "nothing answers there" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("bitdlm serve: cannot join Ray")
    assert time.monotonic() - t0 < 60  # was ~200 s of silence


def test_ray_launcher_start_errors_and_log_levels(monkeypatch, caplog):
    """Ray warned about token auth at every start, a driver Ray refused got a
    40-line traceback, and "serving ..." was a WARNING."""
    import logging
    import signal

    ray = pytest.importorskip("ray")
    from ray import serve

    from bitdlm import serve_cli

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    import argparse

    p = argparse.ArgumentParser()
    serve_cli.add_args(p)
    seen = {}

    def refuse(**kw):
        seen["auth"] = os.environ.get("RAY_AUTH_MODE")
        raise ConnectionError("the cluster refused this driver\n" + "  detail\n" * 40)

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SystemExit) as e:
        serve_cli.ray_launcher.serve_with_ray(p.parse_args(["--replicas", "1", "--threads", "1"]))
    assert seen["auth"] == "token"  # said explicitly: Ray does not warn
    assert e.value.code == ("bitdlm serve: cannot start Ray (ConnectionError): the cluster "
                            "refused this driver")
    # a clean start and stop: the launcher's own lines are INFO, not WARNING
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64})
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "run", lambda *a, **kw: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with caplog.at_level(logging.INFO, logger="bitdlm"):
        rc = serve_cli.ray_launcher.serve_with_ray(p.parse_args(["--replicas", "1", "--threads", "1"]))
    assert rc == 0
    mine = [r for r in caplog.records if r.name == "bitdlm.ray"]
    assert any("serving" in r.getMessage() for r in mine)
    assert all(r.levelno == logging.INFO for r in mine), [(r.levelname, r.getMessage()) for r in mine]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------- item 21: the second pip install

def test_objcache_reuses_objects_across_build_environments(tmp_path):
    """README's two commands compiled the core twice: every pip install is a new
    isolated environment. scripts/objcache.py must hit for the same source seen
    through another environment's headers (whose __FILE__ differs), and miss
    when the source changes."""
    import shutil

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    script = os.path.join(ROOT, "scripts", "objcache.py")
    cache = tmp_path / "cache"
    src = tmp_path / "a.cpp"
    src.write_text('#include "h.h"\nint f(int x) { return g(x) + 1; }\n')
    outs = []
    for env, body in (("A", "x"), ("B", "x"), ("C", "x + 2")):
        inc = tmp_path / f"pip-build-env-{env}" / "include"
        inc.mkdir(parents=True)
        (inc / "h.h").write_text("#include <cassert>\ninline int g(int x) { assert(x != 7); "
                                 f"return {body}; }}\n")
        obj = tmp_path / f"{env}.o"
        cmd = [sys.executable, script, str(cache), gxx, "-isystem", str(inc), "-O2", "-MD",
               "-MT", str(obj), "-MF", f"{obj}.d", "-o", str(obj), "-c", str(src)]
        assert subprocess.run(cmd, timeout=120).returncode == 0
        assert "h.h" in open(f"{obj}.d").read()  # ninja's dependency file, hit or miss
        outs.append((obj.read_bytes(), len(os.listdir(cache))))
    assert outs[1] == (outs[0][0], 1)  # B: a hit, the same object
    assert outs[2][1] == 2 and outs[2][0] != outs[0][0]  # C: new code, a miss
