"""Data pipeline throughput: rows/s and tokens/s of make_train_iterator at seq_len 2048.

    python bench/data.py [--seq-len 2048] [--batch 8] [--batches 40] [--workers 0 1]
                         [--strategies ar random:8] [--out bench/results/data.json]

Corpus: the embedded default (Python stdlib source, byte tokenizer). Each configuration builds a fresh
iterator (timed separately as `startup_s`: corpus load + packing plan + first batch, which includes
worker start-up), then times `--batches` further batches. `ms/batch` is the pipeline time per
global batch of `--batch` rows, to compare with the train step time of the same config.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(seq_len: int, batch: int, batches: int, workers: int, strategy: str) -> dict:
    from a3jax.config import DataConfig, StageConfig
    from a3jax.data import make_train_iterator

    cfg = DataConfig(source="stdlib", seq_len=seq_len, worker_count=workers, prefetch=2,
                     stages=(StageConfig(strategy, 1_000_000),))
    t0 = time.perf_counter()
    it = make_train_iterator(cfg, batch)
    first = next(it)
    startup = time.perf_counter() - t0
    real = 0
    t1 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        real += int((b["segment_ids"] != 0).sum())
    dt = time.perf_counter() - t1
    assert first["tokens"].shape == (batch, seq_len)
    rows = batches * batch
    return {"strategy": strategy, "workers": workers, "seq_len": seq_len, "batch": batch, "batches": batches,
            "startup_s": round(startup, 3), "rows_per_s": round(rows / dt, 1),
            "tokens_per_s": round(rows * seq_len / dt), "real_tokens_per_s": round(real / dt),
            "ms_per_batch": round(1000 * dt / batches, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+", default=["ar", "random:8"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data.json"))
    args = ap.parse_args(argv)
    results = []
    print(f"{'strategy':<10} {'workers':>7} {'startup s':>9} {'rows/s':>8} {'tokens/s':>10} "
          f"{'real tok/s':>10} {'ms/batch':>9}")
    for strategy in args.strategies:
        for w in args.workers:
            r = run(args.seq_len, args.batch, args.batches, w, strategy)
            results.append(r)
            print(f"{strategy:<10} {w:>7} {r['startup_s']:>9.2f} {r['rows_per_s']:>8.1f} "
                  f"{r['tokens_per_s']:>10} {r['real_tokens_per_s']:>10} {r['ms_per_batch']:>9.2f}", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "command": "python bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
