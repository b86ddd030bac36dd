"""The sweep behind configs/demo/*.yaml (docs/benchmarks.md, "The main job: `make demo`").

Short ar-objective pretraining runs of candidate demo models on the embedded stdlib corpus, each for
the same number of steps: held-out nats/byte (byte tokenizer: nats/token = nats/byte) against the
training throughput measured in the same sweep. Runs go one after another, so ratios between rows are
comparable; the absolute tokens/s depend on the machine's load (printed).

    python bench/demo_sweep.py [--steps 300] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> overrides on configs/demo/pretrain.yaml
CANDIDATES = {
    "h128-L4-s128-b16-lr3e-3": ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=4",
                                "data.seq_len=128", "train.global_batch_size=16", "train.optimizer.learning_rate=3e-3"],
    "h128-L4-s128-b16-lr6e-3": ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=4",
                                "data.seq_len=128", "train.global_batch_size=16", "train.optimizer.learning_rate=6e-3"],
    "h128-L4-s256-b8-lr3e-3": ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=4",
                               "data.seq_len=256", "train.global_batch_size=8", "train.optimizer.learning_rate=3e-3"],
    "h192-L4-s128-b16-lr3e-3": ["model.hidden_size=192", "model.intermediate_size=512", "model.num_layers=4",
                                "model.num_heads=6", "model.num_kv_heads=2",
                                "data.seq_len=128", "train.global_batch_size=16", "train.optimizer.learning_rate=3e-3"],
    "h96-L3-s128-b32-lr6e-3": ["model.hidden_size=96", "model.intermediate_size=256", "model.num_layers=3",
                               "model.num_heads=4", "model.num_kv_heads=2",
                               "data.seq_len=128", "train.global_batch_size=32", "train.optimizer.learning_rate=6e-3"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "demo_sweep.json"))
    args = ap.parse_args(argv)

    from a3jax.config import load_config
    from a3jax.train.metrics import read_metrics
    from a3jax.train.trainer import train

    rows = []
    for name, ovs in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        run_dir = tempfile.mkdtemp(prefix="demo_sweep_")
        try:
            cfg = load_config(os.path.join(ROOT, "configs", "demo", "pretrain.yaml"),
                              ovs + [f"run_dir={run_dir}", f"data.stages=[{{ar: {args.steps}}}]",
                                     f"train.eval_every={args.steps}", "train.eval_batches=8",
                                     f"checkpoint.every={args.steps}", "train.log_every=25"])
            load0 = os.getloadavg()[0]
            t0 = time.time()
            res = train(cfg, progress_bar=False, tensorboard=False)
            secs = time.time() - t0
            recs, evals = read_metrics(run_dir)
            tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
            from a3jax.model import param_shapes
            import math
            n_params = sum(math.prod(s) for s in __import__("jax").tree.leaves(
                param_shapes(cfg.model), is_leaf=lambda x: isinstance(x, tuple)))
            row = dict(name=name, overrides=ovs, steps=args.steps,
                       tokens=args.steps * cfg.train.global_batch_size * cfg.data.seq_len,
                       params=n_params, train_loss=res["loss"], heldout_ar=evals[-1]["loss"]["ar"],
                       tokens_per_s=sorted(tps)[len(tps) // 2] if tps else None, seconds=secs,
                       load=[load0, os.getloadavg()[0]])
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n{'candidate':<26} {'params':>8} {'tokens':>9} {'train':>6} {'held-out':>9} {'tok/s':>7} {'load':>9}")
    for r in rows:
        print(f"{r['name']:<26} {r['params']:>8,} {r['tokens']:>9,} {r['train_loss']:>6.3f} {r['heldout_ar']:>9.3f} "
              f"{r['tokens_per_s'] or 0:>7,.0f} {r['load'][0]:>4.1f}-{r['load'][1]:.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
