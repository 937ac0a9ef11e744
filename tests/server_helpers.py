"""Helpers shared by the server tests (test_server, test_harden, test_migrate):
a free port, clients of a server, and `running_server` (the real `bitdlm serve`
process on a model)."""
import contextlib
import re
import signal
import socket
import subprocess
import sys

import httpx
import openai
from helpers import wait_until
from hf_models import child_env

KEY = "sk-test-bitdlm"
MAX_LEN = 256


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@contextlib.contextmanager
def running_server(model, log_path, max_len=MAX_LEN, extra=(), cmd=None):
    """`python -m bitdlm.cli serve` on `model` (or `cmd` + --port); SIGTERM at the end."""
    port = free_port()
    env = child_env(OMP_NUM_THREADS=1)
    if cmd is not None:
        cmd = list(cmd) + ["--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "bitdlm.cli", "serve", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--threads", "1",
               "--max-batch", "16", "--max-queue", "32", "--max-model-len", str(max_len),
               "--served-model-name", "tiny", "--log-level", "warning", "--profile", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(base + "/health", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(healthy, 60, 0.1) and proc.poll() is None, \
            "server did not start:\n" + log_path.read_text()[-3000:]
        yield type("Server", (), {"base": base, "proc": proc, "log": log_path})
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
