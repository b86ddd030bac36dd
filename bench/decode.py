"""Exact KV-cached any-order decoding vs recomputing every step (the reference code's way).

    python bench/decode.py [--blanks 256 512 1024] [--group-sizes 1 4 8] [--uncached-steps 6]
                           [--orders left_to_right] [--out bench/results/decode.json]

Fills N blanks after a 16-token prompt (one row, greedy) with a random model of the `tiny` shape
(4 layers, hidden 256, 8 heads / 4 KV heads, MLP 688, byte vocab 260). Cached: the whole decode
(prefill + all steps) is timed after a compile run. Uncached: every step is a full forward over all
T = 16 + N rows, so its cost per step is flat; on a 2-core CPU running all of them (up to 1024 steps)
takes too long, so the first `--uncached-steps` steps are timed after a compile run and the total is
extrapolated as per-step time x number of steps (said in the table and the JSON).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from a3jax.config import ModelConfig  # noqa: E402
from a3jax.decode import infill  # noqa: E402
from a3jax.model import numpy_init  # noqa: E402

CFG = ModelConfig(max_position_embeddings=2048)  # defaults = configs' tiny shape
PROMPT = 16


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blanks", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--orders", nargs="+", default=["left_to_right"])
    ap.add_argument("--uncached-steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode.json"))
    args = ap.parse_args(argv)
    params = numpy_init(CFG)
    rows = []
    hdr = (f"{'order':<14} {'blanks':>6} {'k':>2} {'steps':>5} {'cached s':>9} {'cached tok/s':>12} "
           f"{'uncached s/step':>15} {'uncached s (extrap.)':>20} {'speedup':>8}")
    print(hdr)
    for order in args.orders:
        for n in args.blanks:
            t = PROMPT + n
            tokens = np.random.default_rng(n).integers(0, 256, (1, t)).astype(np.int32)
            known = (np.arange(t) < PROMPT)[None]
            for k in args.group_sizes:
                run = lambda **kw: infill(CFG, params, tokens, known, order=order, group_size=k,
                                          return_info=True, **kw)
                compile_s, first = timed(lambda: run())
                cached_s, res = timed(lambda: run(), repeat=2)
                steps = res.num_steps
                m = min(args.uncached_steps, steps)
                run(use_cache=False, max_steps=1)  # compile (max_steps is a traced value: same program)
                unc_m, partial = timed(lambda: run(use_cache=False, max_steps=m))
                # the partial uncached run decided the same tokens as the cached one so far
                filled = partial.step >= 0
                same = bool((partial.tokens[filled] == res.tokens[filled]).all())
                per_step = unc_m / m
                unc_total = per_step * steps
                row = dict(order=order, blanks=n, group_size=k, length=t, steps=steps,
                           cached_s=cached_s, cached_compile_s=compile_s, cached_tokens_per_s=n / cached_s,
                           uncached_steps_timed=m, uncached_s_per_step=per_step,
                           uncached_s_extrapolated=unc_total, uncached_tokens_per_s=n / unc_total,
                           speedup=unc_total / cached_s, uncached_prefix_matches_cached=same)
                rows.append(row)
                print(f"{order:<14} {n:>6} {k:>2} {steps:>5} {cached_s:>9.3f} {n / cached_s:>12.1f} "
                      f"{per_step:>15.4f} {unc_total:>20.2f} {unc_total / cached_s:>7.1f}x", flush=True)
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()}-core CPU",
                jax=jax.__version__, backend=jax.default_backend(), model=dict(
                    layers=CFG.num_layers, hidden=CFG.hidden_size, heads=CFG.num_heads, kv_heads=CFG.num_kv_heads,
                    mlp=CFG.intermediate_size, vocab=CFG.vocab_size), prompt_tokens=PROMPT,
                note=f"uncached totals extrapolated from the first {args.uncached_steps} steps (flat per-step cost)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
