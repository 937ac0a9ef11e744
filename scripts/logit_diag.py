#!/usr/bin/env python3
"""Explain bitdlm's logit differences against transformers, code by code.

One random checkpoint (shapes as flags):
    PYTHONPATH=python python3 scripts/logit_diag.py --hidden 512 --layers 2 --heads 8 --kv-heads 2 \\
        --head-dim 64 --theta 1e4 --tokens 24
The sweep over random shapes (docs/logits.md):
    PYTHONPATH=python python3 scripts/logit_diag.py --sweep 60 --json sweep.json

For each case: max |bitdlm - transformers|, and for every position over 1e-3 the
first int8 activation code that differs (layer, op, position, its exact float64
value and distance to the rounding boundary), plus bitdlm's codes against its own
exact model. Exit status 1 if any difference is not explained by a near tie
(tests/logit_ref.py states the rule). Needs torch + transformers (the test extras).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--sweep", type=int, metavar="N", help="N random cases instead of one")
    ap.add_argument("--seed0", type=int, default=0, help="first seed of the sweep")
    ap.add_argument("--json", help="write the sweep's summary and reports here")
    d = {f.name: f.default for f in dataclasses.fields(__import__("logit_ref").Case)}
    for name, default in d.items():
        flag = "--" + {"kv_heads": "kv-heads", "head_dim": "head-dim"}.get(name, name)
        if isinstance(default, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                            help=f"(default {default})")
        else:
            ap.add_argument(flag, dest=name, type=type(default), default=default, help=f"(default {default})")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from logit_ref import Case, diagnose, summary, sweep

    if args.sweep:
        reports = sweep(args.sweep, args.seed0, log=lambda s: print(s, flush=True))
        summ = summary(reports)
        print(json.dumps(summ, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"summary": summ, "cases": [
                    {"case": dataclasses.asdict(r.case), "max_diff": r.max_diff, "bad_positions": r.bad_positions,
                     "first_flips": {p: str(f) for p, f in r.first_flip.items()}, "unexplained": r.unexplained,
                     "self_flips": len(r.self_flips), "ok": r.ok} for r in reports]}, f, indent=1)
        return 0 if summ["all_ok"] else 1
    case = Case(**{k: getattr(args, k) for k in d})
    with tempfile.TemporaryDirectory() as tmp:
        rep = diagnose(case, tmp)
    print(rep.text())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
