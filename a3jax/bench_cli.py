"""`a3jax bench NAME [args]`: runs a benchmark script of the checkout's bench/ directory.

The benchmarks are scripts (bench/NAME.py, each printing a table and writing JSON under
bench/results/), not part of the installed package: they need the repository. `a3jax bench` with no
name lists them with the first line of each docstring; `--bench-dir DIR` points at another copy.
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

DEFAULT_BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def list_benchmarks(bench_dir: str) -> dict[str, str]:
    """name -> first docstring line of every bench/NAME.py (helpers without a docstring included)."""
    out = {}
    for fname in sorted(os.listdir(bench_dir)):
        if fname.endswith(".py") and not fname.startswith("_"):
            with open(os.path.join(bench_dir, fname), encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read())) or ""
            out[fname[:-3]] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def cli_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax bench", description=__doc__.splitlines()[0],
                                 epilog="Arguments after NAME go to the script (a3jax bench NAME --help).")
    ap.add_argument("--bench-dir", default=DEFAULT_BENCH_DIR, help="directory holding the bench scripts")
    ap.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.bench_dir):
        print(f"a3jax bench: error: no bench directory at {args.bench_dir} (the benchmarks live in the "
              f"repository checkout; pass --bench-dir)", file=sys.stderr)
        return 2
    scripts = list_benchmarks(args.bench_dir)
    if args.name is None:
        print(f"benchmarks in {args.bench_dir}:")
        for name, doc in scripts.items():
            print(f"  {name:<16} {doc}")
        return 0
    if args.name not in scripts:
        print(f"a3jax bench: error: no benchmark {args.name!r} in {args.bench_dir} "
              f"(available: {', '.join(scripts)})", file=sys.stderr)
        return 2
    # A child process: each script sets up its own devices and environment before importing jax.
    return subprocess.call([sys.executable, os.path.join(args.bench_dir, args.name + ".py"), *args.args])
