"""`bitdlm` command line. Each command is defined next to the code it runs
(`register_cli(subparsers)` in its module); this file only wires them, and
owns what every command shares: the help format (defaults shown), `--version`,
and the clean error for a missing Python package."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command, module defining register_cli)
_COMMANDS = [
    ("convert", "bitdlm.convert"),
    ("info", "bitdlm.format"),
    ("generate", "bitdlm.generate"),
    ("serve", "bitdlm.serve_cli"),
    ("bench", "bitdlm.bench"),
]

# import name -> pip name, where they differ
_PIP_NAMES = {"prometheus_client": "prometheus-client", "llama_cpp": "llama-cpp-python", "yaml": "pyyaml"}


class MissingDependency(RuntimeError):
    """A Python package a command needs is not installed (message says what to pip install)."""


def require(module: str, why: str, pip_name: str | None = None):
    """Import `module` or raise MissingDependency("<why> needs <module>: pip install ...").
    Commands call it before any long work starts, so a missing optional package
    never costs the user a whole run."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_name = pip_name or _PIP_NAMES.get(module, module)
        raise MissingDependency(f"{why} needs {module}: pip install {pip_name}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after an option's help, unless the help already says
    its default in words ("default: the model's") or there is nothing to show
    (None, or a flag that takes no value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            return text
        if action.nargs == 0:
            return text  # a flag (store_true/false/const): its help says what it does
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text  # a required positional has no default
        return text + " (default: %(default)s)"


class _Commands(argparse._SubParsersAction):
    """Sub-commands whose `--help` opens with their one-line help when they
    have no longer description (argparse would print none)."""

    def add_parser(self, name, **kwargs):
        text = kwargs.get("help")
        if kwargs.get("description") is None and text:
            kwargs["description"] = text[0].upper() + text[1:] + "."
        return super().add_parser(name, **kwargs)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose help shows defaults; add_subparsers() hands the
    class down, so every command and sub-command gets it without opting in."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("action", _Commands)
        return super().add_subparsers(**kwargs)


def version_report() -> tuple[str, int]:
    """(the --version text, exit status): package, native core build, ISAs, OpenMP.
    Exit 1 when the native core cannot be loaded (a broken install) or
    BITDLM_ISA names an ISA it cannot run, after printing what is known."""
    import platform

    from . import __version__

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    lines = [f"bitdlm {__version__} ({pkg_dir})",
             f"python {platform.python_version()} ({sys.executable})"]
    try:
        from . import _core
    except ImportError as e:
        lines.append(f"native core: cannot be loaded: {e}")
        return "\n".join(lines), 1
    forced = os.environ.get("BITDLM_ISA")
    rc = 0
    try:
        isa = _core.active_isa() + (f" (forced by BITDLM_ISA={forced})" if forced else " (picked by the dispatcher)")
    except RuntimeError as e:  # a BITDLM_ISA this CPU cannot run: every forward would fail too
        isa, rc = f"none: {e}", 1
    lines.append(f"kernel ISA: {isa}; this CPU runs: {', '.join(_core.supported_isas())}")
    info = _core.build_info() if hasattr(_core, "build_info") else None
    if info is None:
        lines.append("build: unknown (a core built before build_info() existed)")
    else:
        omp = info["openmp"]
        lines += [f"compiler: {info['compiler']}, C++ {info['cplusplus']}, pybind11 {info['pybind11']}",
                  f"build flags: {', '.join(info['flags'])}",
                  f"OpenMP: {omp['spec']} (_OPENMP {omp['_OPENMP']}), runtime {omp['library']}, "
                  f"{_core.get_max_threads()} threads by default here"]
    return "\n".join(lines), rc


class _VersionAction(argparse.Action):
    """--version, computed only when asked (loading the core costs every other command time)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        text, rc = version_report()
        print(text)
        parser.exit(rc)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bitdlm", description="CPU inference for ternary (BitNet b1.58) block-diffusion language models.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version, the kernel ISA in use, the compiler and OpenMP of the build, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, module in _COMMANDS:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    name = " ".join(x for x in ("bitdlm", args.command, getattr(args, "bench_command", None)) if x)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except MissingDependency as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from .format import ModelFormatError

        if not isinstance(e, ModelFormatError):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)  # a damaged or foreign model file
        return 2
    except ModuleNotFoundError as e:
        # a required dependency removed after install (or installed with --no-deps)
        if not e.name or e.name.split(".")[0] in ("bitdlm",):
            raise
        top = e.name.split(".")[0]
        print(f"{name}: error: Python package {top!r} is missing: "
              f"pip install {_PIP_NAMES.get(top, top)} (or reinstall bitdlm)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
