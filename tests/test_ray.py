"""`bitdlm serve --replicas 2` on a local Ray instance, driven over loopback
HTTP through Ray Serve's proxy with the official `openai` client.

One Ray instance for the whole module (starting Ray dominates the time): the
real CLI in a subprocess on the packaged model, 2 replicas x 1 thread, a small
object store. The replica-kill test and the shutdown test come last, in that
order (pytest keeps file order). Every test runs under an alarm, every HTTP call
has a timeout and every wait a deadline."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
from helpers import wait_until  # noqa: E402
from hf_models import child_env  # noqa: E402

KEY = "sk-test-ray"
REPLICAS = 2
RAY_PROCESSES = ("raylet", "gcs_server")
TEST_TIMEOUT_S = 150  # per test; the fixture's start (Ray + 2 replicas) counts in the first


@pytest.fixture(autouse=True)
def _alarm():
    """A hung test fails instead of hanging CI (no pytest-timeout needed)."""
    def fire(*_):
        raise TimeoutError(f"test ran past {TEST_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30, trust_env=False)


def client_for(base, max_retries=0):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=max_retries, timeout=60,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def replica_of(resp):
    return resp.headers["x-bitdlm-replica"], int(resp.headers["x-bitdlm-pid"])


def replicas_seen(base, tries=60):
    """{replica id: pid} over up to `tries` /health calls through the proxy (its
    power-of-two-choices routing reaches both in a few)."""
    seen = {}
    with http(base) as c:
        for _ in range(tries):
            try:
                r = c.get("/health", timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                rid, pid = replica_of(r)
                seen[rid] = pid
                if len(seen) >= REPLICAS:
                    break
    return seen


def ray_descendants(proc):
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Cluster:
    def __init__(self, proc, base, log_path):
        self.proc, self.base, self.log_path = proc, base, log_path

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray_serve") / "serve.log"
    cmd = [sys.executable, "-m", "bitdlm.cli", "serve", "--replicas", str(REPLICAS),
           "--threads", "1", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
           "--max-batch", "8", "--max-queue", "32", "--ray-object-store-mb", "100",
           "--log-level", "warning"]
    # RAY_USAGE_STATS_ENABLED=0: no usage report (and no network attempt) from CI;
    # RAY_TMPDIR: Ray's session files (logs, sockets) in a directory removed at the end
    # (short: Unix socket paths are limited to 107 bytes)
    ray_tmp = tempfile.mkdtemp(prefix="bitdlm-ray-", dir="/tmp")
    env = child_env(OMP_NUM_THREADS=1, RAY_USAGE_STATS_ENABLED=0, RAY_TMPDIR=ray_tmp)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    c = Cluster(proc, f"http://127.0.0.1:{port}", log_path)
    descendants = []
    try:
        def up():
            if proc.poll() is not None:
                return True
            descendants[:] = ray_descendants(proc) or descendants
            return len(replicas_seen(c.base, tries=4)) == REPLICAS

        wait_until(up, timeout=120, interval=0.5)
        assert proc.poll() is None, f"bitdlm serve --replicas exited:\n{c.log()}"
        assert len(replicas_seen(c.base)) == REPLICAS, f"replicas did not come up:\n{c.log()}"
        yield c
    finally:
        # normally test_shutdown_... has stopped it; after a failure, no Ray left behind
        if proc.poll() is None:
            descendants = ray_descendants(proc) or descendants
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for p in [psutil.Process(proc.pid)] if proc.poll() is None else []:
            p.kill()
        for p in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------- no Ray needed


def test_plain_install_does_not_import_ray():
    code = ("import sys, bitdlm.cli, bitdlm.server, bitdlm.ray\n"
            "p = bitdlm.cli.build_parser()\n"
            "a = p.parse_args(['serve', '--replicas', '2', '--threads', '1'])\n"
            "assert a.replicas == 2 and a.threads == 1\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--model", "/nonexistent/m.bin"], "no such file"),
    (["--min-replicas", "2"], "give both --min-replicas and --max-replicas"),
    (["--ray-object-store-mb", "100"], "--ray-object-store-mb is for Ray Serve"),
    # the server's own flags are checked on the driver too, before Ray starts
    (["--replicas", "2", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--replicas", "2", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
])
def test_bad_ray_flags_are_clear_errors_before_ray_starts(argv, message):
    out = subprocess.run([sys.executable, "-m", "bitdlm.cli", "serve", *argv], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_app_builder_for_serve_run(tmp_path):
    """`serve run bitdlm.ray:app k=v` passes one dict of strings; Python callers use keywords."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    import bitdlm.ray as br

    a = call_user_app_builder_with_args_if_necessary(
        br.app, {"threads": "3", "replicas": "2", "max-batch": "4", "profile": "true"})
    assert isinstance(a, Application)
    d = a._bound_deployment
    assert d.num_replicas == 2 and d.ray_actor_options["num_cpus"] == 3
    assert d.max_ongoing_requests == 4 + 64  # the replica's batch + queue decide, not Ray's 5
    opts = a._bound_deployment.init_args[0]
    assert opts["threads"] == 3 and opts["max_batch"] == 4 and opts["profile"] is True
    assert "replicas" not in opts  # Ray's flags stay on the driver

    a = br.app(threads=1, min_replicas=1, max_replicas=3)
    cfg = a._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 3, 16)

    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        br.app(bogus=1)
    with pytest.raises(ValueError, match="invalid int value"):
        br.app(threads="many")
    with pytest.raises(ValueError, match="--min-replicas must be <= --max-replicas"):
        br.app(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="no such file"):
        br.app(model=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="--max-queue must be >= 0"):
        br.app(max_queue=-1)


# ------------------------------------------------------- 2 replicas on Ray


def test_openai_completion_chat_and_stream(cluster):
    c = client_for(cluster.base)
    kw = dict(model="tiny-bitdlm", max_tokens=12, temperature=0)
    r = c.completions.create(prompt="The capital of France is", **kw)
    text = r.choices[0].text
    assert text and r.usage.completion_tokens > 0
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(prompt="The capital of France is", stream=True, **kw)
                       if ch.choices)
    assert streamed == text

    msgs = [{"role": "user", "content": "Say hello."}]
    r = c.chat.completions.create(messages=msgs, **kw)
    chat = r.choices[0].message.content
    assert chat and r.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(messages=msgs, stream=True, **kw)
                       if ch.choices)
    assert streamed == chat


def completions_200(base):
    """{replica: (pid, bitdlm_http_requests_total of /v1/completions 200)} from
    each replica's own /metrics, reached through the proxy."""
    seen = {}
    pat = re.compile(r'^bitdlm_http_requests_total\{route="/v1/completions",status="200"\} (\S+)$',
                     re.M)
    with http(base) as c:
        for _ in range(60):
            r = c.get("/metrics")
            assert r.status_code == 200
            m = pat.search(r.text)
            rid, pid = replica_of(r)
            seen[rid] = (pid, float(m.group(1)) if m else 0.0)
            if len(seen) == REPLICAS:
                break
    assert len(seen) == REPLICAS, seen
    return seen


def test_concurrent_requests_spread_over_both_replicas(cluster):
    before = completions_200(cluster.base)
    n = 20

    def one(i):
        with http(cluster.base) as c:
            r = c.post("/v1/completions", json={"prompt": f"Number {i} is", "max_tokens": 8,
                                                "temperature": 0})
        return r.status_code, replica_of(r)[0], r.json()

    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    assert all(status == 200 for status, _, _ in results), results
    assert all(body["choices"][0]["finish_reason"] in ("stop", "length") for *_, body in results)
    by_header = {rid for _, rid, _ in results}
    assert len(by_header) == REPLICAS, by_header
    # the replicas' own counters agree: together they served exactly these n
    after = completions_200(cluster.base)
    deltas = {rid: after[rid][1] - before[rid][1] for rid in after}
    assert sum(deltas.values()) == n and all(d > 0 for d in deltas.values()), deltas


def test_errors_are_the_single_servers(cluster):
    """The same status and JSON as the single-process app (built in-process here,
    on the same packaged model, without Ray)."""
    import argparse

    from starlette.testclient import TestClient

    from bitdlm.server import add_serve_args, build_from_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    single, _ = build_from_args(p.parse_args(["--threads", "1", "--api-key", KEY,
                                              "--max-batch", "8", "--max-queue", "32"]))
    cases = [
        ("post", "/v1/completions", {"content": b"{not json"}, KEY),
        ("post", "/v1/completions", {"json": {"max_tokens": 4}}, KEY),  # no prompt
        ("post", "/v1/completions", {"json": {"prompt": "x", "max_tokens": -1}}, KEY),
        ("post", "/v1/completions", {"json": {"prompt": "x", "model": "gpt-9"}}, KEY),
        ("post", "/v1/chat/completions", {"json": {"messages": []}}, KEY),
        ("get", "/v1/nowhere", {}, KEY),
        ("get", "/v1/models", {}, "sk-wrong"),
        ("get", "/v1/models", {}, None),
    ]
    with TestClient(single) as local:
        for method, path, kw, key in cases:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            want = getattr(local, method)(path, headers=headers, **kw)
            with http(cluster.base, key) as c:
                got = getattr(c, method)(path, **kw)
            assert 400 <= want.status_code < 500, (path, want.status_code)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), (path, kw)
            assert got.headers.get("www-authenticate") == want.headers.get("www-authenticate")


def test_killed_replica_is_replaced_and_requests_keep_succeeding(cluster):
    """SIGKILL one replica: the proxy routes around it while Ray restarts it.
    The client retries with backoff (the openai client's own retries on 5xx and
    connection errors, documented in docs/scaling.md) for the requests that were
    on the killed replica at that moment."""
    seen = replicas_seen(cluster.base)
    assert len(seen) == REPLICAS
    victim_rid, victim = next(iter(seen.items()))
    c = client_for(cluster.base, max_retries=4)
    stop = threading.Event()
    results, errors = [], []

    def load():
        i = 0
        while not stop.is_set():
            try:
                r = c.completions.create(model="tiny-bitdlm", prompt=f"Item {i}", max_tokens=6,
                                         temperature=0)
                results.append(r.choices[0].text)
            except Exception as e:  # noqa: BLE001 (recorded, asserted below)
                errors.append(repr(e))
            i += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # requests in flight on both replicas
    n_before = len(results)
    os.kill(victim, signal.SIGKILL)

    def back_to_two():
        now = replicas_seen(cluster.base, tries=8)
        return len(now) == REPLICAS and victim not in now.values() and now

    now = wait_until(back_to_two, timeout=90, interval=0.5)
    time.sleep(1.0)  # and some more requests after the restart
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert now, f"the deployment did not get back to {REPLICAS} replicas:\n{cluster.log()}"
    assert victim_rid not in now  # a new replica, not the dead one answering
    assert len(results) > n_before + 4, (n_before, len(results))
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


def test_shutdown_leaves_no_ray_processes(cluster):
    procs = ray_descendants(cluster.proc)
    names = {p.name() for p in procs if p.is_running()}
    assert set(RAY_PROCESSES) <= names, names  # the processes we check for do exist
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(90) == 0, cluster.log()
    gone, alive = psutil.wait_procs(procs, timeout=30)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    with pytest.raises(httpx.HTTPError):
        httpx.get(cluster.base + "/health", timeout=2, trust_env=False)

