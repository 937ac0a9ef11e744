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
