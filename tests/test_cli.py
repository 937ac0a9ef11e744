"""The `bitdlm` command line as a newcomer meets it: --version, --help of every
command, and clean errors for a missing Python package (issue 16)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bitdlm
from bitdlm import _core, bench, cli

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = str(Path(bitdlm.__file__).parent / "data" / "tiny-bitdlm.bin")


def run_cli(*argv, pre: str = "", env=None, timeout=120):
    """`bitdlm ARGV` in a fresh interpreter (the same bitdlm as the tests), after
    running `pre` (e.g. hiding a module)."""
    code = f"import sys\n{pre}\nfrom bitdlm.cli import main\nsys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", code], env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)


def hide(module: str) -> str:
    """Source that makes `import module` fail as if it were not installed."""
    return f"sys.modules[{module!r}] = None"


# ----------------------------------------------------------------------------- --version


def test_build_info_describes_this_build():
    info = _core.build_info()
    assert set(info) >= {"compiler", "cplusplus", "flags", "openmp", "pybind11"}
    assert info["cplusplus"] >= 201703  # CMakeLists asks for C++17
    assert re.match(r"(gcc|clang) \d+\.\d+", info["compiler"]), info["compiler"]
    omp = info["openmp"]
    assert omp["_OPENMP"] >= 200805 and re.fullmatch(r"\d\.\d", omp["spec"])
    assert os.path.isfile(omp["library"]), omp  # the runtime the core really loaded
    assert "baseline x86-64" in info["flags"], "the baseline code must not be built for a newer ISA"
    assert any("__OPTIMIZE__" in f for f in info["flags"]), "the core must be an optimised build"


@pytest.mark.slow
def test_version_reports_package_isa_compiler_openmp():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"bitdlm {bitdlm.__version__} " in out
    assert f"kernel ISA: {_core.active_isa()} (picked by the dispatcher)" in out
    assert f"this CPU runs: {', '.join(_core.supported_isas())}" in out
    info = _core.build_info()
    # (the OpenMP runtime is the child's own: in this process torch may have loaded its libgomp first)
    assert info["compiler"] in out and "OpenMP: " in out and "runtime /" in out and "libgomp" in out
    assert "Traceback" not in r.stderr


def test_version_shows_a_forced_isa_and_fails_on_one_the_cpu_lacks():
    r = run_cli("--version", env=child_env(BITDLM_ISA="scalar"))
    assert r.returncode == 0 and "kernel ISA: scalar (forced by BITDLM_ISA=scalar)" in r.stdout
    missing = [i for i in ("avx512vnni", "avx512", "avx2") if i not in _core.supported_isas()]
    if missing:  # on this CPU some ISA is absent: asking for it must say so, not crash
        r = run_cli("--version", env=child_env(BITDLM_ISA=missing[0]))
        assert r.returncode == 1 and "not supported by this CPU" in r.stdout
        assert "Traceback" not in r.stderr and f"bitdlm {bitdlm.__version__}" in r.stdout


def test_version_without_native_core_says_so():
    r = run_cli("--version", pre=hide("bitdlm._core"))
    assert r.returncode == 1
    assert f"bitdlm {bitdlm.__version__}" in r.stdout and "native core: cannot be loaded" in r.stdout


# ----------------------------------------------------------------------------- --help


def _walk(parser, path=("bitdlm",)):
    """(command path, parser) for the parser and every sub-command under it."""
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _walk(sub, path + (name,))


def _commands():
    return [" ".join(p) for p, _ in _walk(cli.build_parser())]


@pytest.mark.parametrize("command", _commands())
def test_every_option_of_every_command_has_help_and_shows_its_default(command):
    parser = dict((" ".join(p), sp) for p, sp in _walk(cli.build_parser()))[command]
    problems = [] if parser.description else ["no description"]
    fmt = parser._get_formatter()
    for a in parser._actions:
        name = "/".join(a.option_strings) or a.dest
        if isinstance(a, argparse._SubParsersAction):
            problems += [f"sub-command {c.dest!r} has no help" for c in a._choices_actions if not c.help]
            continue
        if not a.help or a.help == argparse.SUPPRESS:
            problems.append(f"{name} has no help text")
            continue
        shown = fmt._expand_help(a)
        if a.nargs != 0 and a.default is not None and a.default is not argparse.SUPPRESS:
            if "default" not in shown.lower():
                problems.append(f"{name}: help does not show its default {a.default!r}")
    assert not problems, f"{command}: " + "; ".join(problems)


def test_help_texts_name_their_defaults(capsys):
    for argv, wanted in ((["generate", "--help"], ["(default: 256)", "--threads", "OMP_NUM_THREADS"]),
                         (["bench", "threads", "--help"], ["--warmup", "(default: 1)", "(default: 5)"]),
                         (["bench", "--help"], ["bench/README.md", "threads"])):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        for w in wanted:
            assert w in out, (argv, w)
    assert "(default: None)" not in out and "(default: False)" not in out


def test_flags_without_a_value_show_no_default():
    # --no-shift is a store_false whose dest defaults to None (the config decides): no "(default: True)"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    line = next(x for x in help_text.splitlines() if "--no-shift" in x and "predict" in x)
    assert "default" not in line


# ----------------------------------------------------------------------------- missing packages


def test_plot_without_matplotlib_fails_before_the_sweep(tmp_path):
    js = tmp_path / "t.json"
    t0 = time.perf_counter()
    r = run_cli("bench", "threads", "--model", TINY, "--threads", "1", "--json", str(js),
                "--plot", str(tmp_path / "t.png"), pre=hide("matplotlib"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "bitdlm bench threads: error: --plot needs matplotlib: pip install matplotlib"
    assert "Traceback" not in r.stderr and "phase" not in r.stdout  # no table: no sweep ran
    assert not js.exists()
    assert time.perf_counter() - t0 < 60


def test_plot_into_a_missing_directory_fails_before_the_sweep(tmp_path):
    r = run_cli("bench", "threads", "--model", TINY, "--threads", "1", "--plot", str(tmp_path / "no" / "t.png"))
    assert r.returncode != 0 and "directory does not exist" in r.stderr and "Traceback" not in r.stderr
    assert "phase" not in r.stdout


@pytest.mark.parametrize("argv,module", [
    (["generate", "hello", "--max-tokens", "2"], "tokenizers"),
    (["convert", "no-such-dir", "out.bin"], "tokenizers"),
    (["serve", "--port", "1"], "uvicorn"),
])
def test_a_missing_required_package_is_a_clean_error(argv, module, tmp_path):
    # e.g. installed with --no-deps: say what to pip install, no traceback
    if argv[0] == "convert":  # a real checkpoint folder, so conversion gets as far as the tokenizer
        hf = tmp_path / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({
            "architectures": ["BitNetForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 160, "vocab_size": 300}))
        (hf / "tokenizer.json").write_text("{}")
        argv = ["convert", str(hf), str(tmp_path / "out.bin")]
    r = run_cli(*argv, pre=hide(module))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"pip install {module}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.bin").exists()


def test_require_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(cli.MissingDependency, match=r"^the comparison needs llama_cpp: pip install llama-cpp-python$"):
        cli.require("llama_cpp", "the comparison")
    assert cli.require("json", "x") is json


# ----------------------------------------------------------------------------- bench threads output


def test_threads_table_and_plot_use_the_readme_phase_names():
    res = {t: {p: {"median_ms": ms} for p in bench.PHASES} for t, ms in ((1, 100.0), (2, 60.0))}
    rows = bench.threads_rows(res, prompt=128)
    table = bench.format_table(rows)
    labels = ["prefill (128 tokens)", "decode", "32-token step"]
    for label in labels:
        assert re.search(rf"^{re.escape(label)}\s+\d", table, re.M), (label, table)
    assert "step32" not in table  # the JSON key, not a word
    doc = (ROOT / "bench" / "README.md").read_text()
    for label in ("prefill", "decode", "32-token step"):
        assert f"`{label}" in doc, f"bench/README.md does not name the phase {label!r}"


def test_load_average_is_rounded_in_the_title():
    info = {"cpu": "Some CPU", "loadavg_at_start": (3.2392578125, 1.0, 0.5)}
    title = bench.threads_title("/x/m.bin", info, 2, 128)
    assert "load average at start 3.24 1.00 0.50" in title and "3.2392578125" not in title
    assert "unknown" in bench.threads_title("m.bin", dict(info, loadavg_at_start=None), 2, 128)
