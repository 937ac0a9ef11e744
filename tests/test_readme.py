"""README.md's snippets, executed, so that they stay true.

Every fenced ```python block and every command of every ```bash / ```sh block
runs, in README order, in one scratch folder; a command that cannot run here is
listed in NOT_RUN with the reason, so a new snippet runs by default. What
changes against the README text, and why:

- `./my-bitnet-dlm` is a tiny random Hugging Face checkpoint (tests/hf_models.py)
  made in the scratch folder, so `bitdlm convert ./my-bitnet-dlm model.bin` and
  every later `model.bin` command use a real converted model;
- optional arguments written `[--flag value]` are passed (all of them);
- `--max-tokens N` / `max_tokens=N` are capped at MAX_TOKENS, and `bitdlm
  generate` without `--max-tokens` gets it (speed only);
- one OpenMP thread (_env): on a loaded machine more threads than free cores
  make every forward wait at barriers, and threads are tested elsewhere;
- the Python snippets load the packaged tiny model where they say "model.bin";
- `bitdlm serve` runs until /health answers on a free port, then is stopped;
- `bitdlm` is `python -m bitdlm.cli` of the bitdlm under test.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import bitdlm

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import child_env, make_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TINY = str(Path(bitdlm.__file__).parent / "data" / "tiny-bitdlm.bin")
MAX_TOKENS = 16
TIMEOUT = 180


def _env():
    return child_env(OMP_NUM_THREADS=1)

# (regex on the command as written, reason it is not run here)
NOT_RUN = [
    (r"^pip install\b", "installs bitdlm: CI has done it before the tests run"),
    (r"^python3? -m pytest\b|\bpython3? -m pytest\b", "the test suite itself"),
    (r"^sudo apt-get\b", "installs system packages"),
    (r"scripts/dev_build\.sh", "compiles the core (minutes on 2 cores); CI builds it through pip"),
]
EXECUTED_LANGS = ("python", "bash", "sh")


def fenced_blocks(text: str):
    """(language, line number, body) of every ``` fenced block."""
    out = []
    for m in re.finditer(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        out.append((m.group(1).lower(), text.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: continuations joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", body)
    cmds = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cmds += [c.strip() for c in line.split(" && ") if c.strip()]
    return cmds


def not_run_reason(cmd: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, cmd):
            return reason
    return None


def _blocks():
    return fenced_blocks(README.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- running


def _argv(cmd: str) -> list[str]:
    """The command as argv: `[--opt v]` groups passed, max tokens capped, bitdlm/python mapped."""
    words = []
    for w in shlex.split(cmd):
        words.append(w.lstrip("[").rstrip("]") if (w.startswith("[") or w.endswith("]")) else w)
    for i, w in enumerate(words[:-1]):
        if w == "--max-tokens":
            words[i + 1] = str(min(int(words[i + 1]), MAX_TOKENS))
    if words[:2] == ["bitdlm", "generate"] and "--max-tokens" not in words:
        words += ["--max-tokens", str(MAX_TOKENS)]
    if words[0] == "bitdlm":
        return [sys.executable, "-m", "bitdlm.cli"] + words[1:]
    if words[0] in ("python", "python3"):
        return [sys.executable] + words[1:]
    return words


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_until_healthy(argv: list[str], cwd: Path) -> str:
    """Start a server command, wait for GET /health, stop it. '' or what went wrong."""
    port = _free_port()
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    errf = open(cwd / "serve.log", "w+")
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=errf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return ""
            except OSError:
                time.sleep(0.3)
        errf.seek(0)
        return f"no healthy server (exit {proc.poll()}):\n{errf.read()[-3000:]}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errf.close()


def run_command(cmd: str, cwd: Path) -> str:
    """Run one README command; '' if it did what it says, else the failure."""
    argv = _argv(cmd)
    if argv[1:3] == ["-m", "bitdlm.cli"] and len(argv) > 3 and argv[3] == "serve":
        return _serve_until_healthy(argv, cwd)
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0 or "Traceback" in r.stderr:
        return f"exit {r.returncode}\nstdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}"
    if "--stats" in argv and "tokens/forward" not in r.stderr:
        return f"--stats printed no statistics: {r.stderr[-1000:]}"
    for flag in ("--json", "--plot"):
        if flag in argv and not (cwd / argv[argv.index(flag) + 1]).is_file():
            return f"{flag} wrote nothing"
    return ""


# ----------------------------------------------------------------------------- tests


def test_readme_has_the_snippets_this_test_is_about():
    blocks = _blocks()
    cmds = [c for lang, _, body in blocks if lang in ("bash", "sh") for c in shell_commands(body)]
    for wanted in ('bitdlm generate "def fibonacci(n):" --stats', "bitdlm --version", "bitdlm info model.bin",
                   "bitdlm convert ./my-bitnet-dlm model.bin"):
        assert any(c.startswith(wanted) for c in cmds), wanted
    assert any(lang == "python" for lang, _, _ in blocks)
    # the first two commands of the README, exactly (CI and newcomers type them)
    first = next(body for lang, _, body in blocks if lang == "bash")
    assert 'pip install . && bitdlm generate "def fibonacci(n):" --stats' in first
    assert 'pip install ".[test]" && python3 -m pytest -q tests' in first


def test_every_not_run_entry_is_still_needed():
    cmds = [c for lang, _, body in _blocks() if lang in ("bash", "sh") for c in shell_commands(body)]
    for pattern, reason in NOT_RUN:
        assert any(re.search(pattern, c) for c in cmds), f"NOT_RUN entry {pattern!r} ({reason}) matches nothing"


@pytest.mark.slow
def test_readme_shell_commands_run(tmp_path):
    make_hf_model(tmp_path / "my-bitnet-dlm")  # what `bitdlm convert ./my-bitnet-dlm model.bin` reads
    failures, ran = [], 0
    for lang, line, body in _blocks():
        if lang not in ("bash", "sh"):
            continue
        for cmd in shell_commands(body):
            if not_run_reason(cmd):
                continue
            problem = run_command(cmd, tmp_path)
            ran += 1
            if problem:
                failures.append(f"README.md:{line}: {cmd}\n{problem}")
    assert ran >= 6
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("line,body", [pytest.param(line, body, id=f"README.md:{line}")
                                       for lang, line, body in _blocks() if lang == "python"])
def test_readme_python_snippet_runs(line, body, tmp_path):
    code = body.replace('"model.bin"', repr(TINY))
    code = re.sub(r"max_tokens=(\d+)", lambda m: f"max_tokens={min(int(m.group(1)), MAX_TOKENS)}", code)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"README.md:{line}:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), "the snippet prints its results"


def test_languages_of_fenced_blocks_are_known():
    # a block in another language would silently escape this test
    for lang, line, _ in _blocks():
        assert lang in EXECUTED_LANGS + ("text", "json", "console-output"), f"README.md:{line}: ```{lang}"
