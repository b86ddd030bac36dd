"""Throughput of the HumanEval executor: programs per second through a3jax.sandbox.

    python bench/sandbox.py [--workers 1 2] [--repeat 2] [--out bench/results/sandbox.json]

Runs HumanEval's 164 canonical programs (prompt + solution + test + check), each in its own sandboxed
subprocess, with each worker count; prints a table and writes JSON (machine, isolation mode, times).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from a3jax.eval import humaneval  # noqa: E402
from a3jax.sandbox import Limits, Sandbox  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="passes over the 164 programs per worker count")
    ap.add_argument("--mode", default="auto", help="sandbox mode: auto | uid | namespaces | guard")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sandbox.json"))
    args = ap.parse_args(argv)
    progs = [p["prompt"] + p["canonical_solution"] + f"\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
             for p in humaneval.load_problems()] * args.repeat
    rows = []
    for w in args.workers:
        sb = Sandbox(Limits(), workers=w, mode=args.mode)
        t0 = time.perf_counter()
        outs = sb.run_many(progs)
        dt = time.perf_counter() - t0
        rows.append(dict(workers=w, programs=len(progs), passed=sum(o.passed for o in outs), seconds=round(dt, 2),
                         programs_per_s=round(len(progs) / dt, 1), mode=sb.mode))
    print(f"{'workers':>7} {'programs':>8} {'passed':>6} {'seconds':>8} {'prog/s':>7}  mode")
    for r in rows:
        print(f"{r['workers']:>7} {r['programs']:>8} {r['passed']:>6} {r['seconds']:>8} {r['programs_per_s']:>7}  "
              f"{r['mode']}")
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
               command="python bench/sandbox.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               rows=rows)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
