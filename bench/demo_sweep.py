"""The sweep behind configs/demo/*.yaml (docs/demo.md, "How the configuration was chosen").

Short ar-objective pretraining runs of candidate demo models on the embedded stdlib corpus, each for
the same number of steps: held-out nats/byte (byte tokenizer: nats/token = nats/byte) against the
training throughput measured in the same sweep. Runs go one after another, so ratios between rows are
comparable; the absolute tokens/s depend on the machine's load (printed).

    python bench/demo_sweep.py [--steps 300] [--only NAME ...]

`--adapt`: whole demos without the parallel-decoding table (`a3jax.demo.run`), one per candidate of
ADAPT_CANDIDATES (pretrain and adapt overrides on configs/demo): held-out nats/byte of both models,
the infilling benchmark in every order, the span NLL and the adaptation's held-out curve. Candidates
with the same pretraining share one pretrained run (trained once, copied: the demo resumes it), so
the rows differ only in what they change.

    python bench/demo_sweep.py --adapt [--only NAME ...] [--out bench/results/demo_adapt_sweep.json]
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


def _stages(spec: str) -> str:
    """'ar:40,random:4:200' -> the data.stages override's value."""
    parts = [p.rsplit(":", 1) for p in spec.split(",")]
    return "[" + ", ".join(f'{{"{k}": {v}}}' for k, v in parts) + "]"


# name -> (pretrain overrides, adapt overrides) on configs/demo (prefix-free: the demo routes them)
CURVE = ["train.eval_at_start=true"]  # the held-out curve from the converted model's step 0
CUR = "ar:20,blocks:2:20,blocks:4:20,random:4:80,random:8:100"  # configs/demo/adapt.yaml before the sweep


def scaled(spec: str, k: float) -> str:
    return ",".join(f"{p.rsplit(':', 1)[0]}:{round(int(p.rsplit(':', 1)[1]) * k)}" for p in spec.split(","))


ADAPT_CANDIDATES = {
    "p500-a240": ([], CURVE + ["train.eval_every=60"]),
    "p500-a240-untrainedq": ([], CURVE + ["train.eval_every=60"]),
    "p500-a240-lr4e-3": ([], CURVE + ["train.eval_every=60", "train.optimizer.learning_rate=4e-3"]),
    "p500-a900": ([], CURVE + ["train.eval_every=150", f"data.stages={_stages(scaled(CUR, 3.75))}"]),
    # the curriculum's shape at 480 steps (stages kept: ar -> blocks -> random)
    "p500-a480": ([], [f"data.stages={_stages(scaled(CUR, 2))}", "train.eval_every=240"]),
    "p500-a480-infill": ([], [f"data.stages={_stages('ar:40,blocks:2:40,blocks:4:40,random:4:160,random:8:80,infill:0.25:8:1:120')}",
                              "train.eval_every=240"]),
    "p500-a480-infill240": ([], [f"data.stages={_stages('ar:40,blocks:2:40,blocks:4:40,random:4:80,random:8:40,infill:0.25:8:1:240')}",
                                 "train.eval_every=240"]),
    "p500-a480-r4heavy": ([], [f"data.stages={_stages('ar:40,blocks:2:40,blocks:4:40,random:4:280,random:8:80')}",
                               "train.eval_every=240"]),
}


def _untrained_query_base(out: str) -> None:
    """The A/B baseline of the `-untrainedq` rows: an adaptation that starts from the AR model's
    untrained query vector (its random-init value), as if a3-to-hf wrote it and hf-to-a3 read it back,
    instead of from the trained embeddings' mean. Pre-made here, so the demo keeps these hf/ and base/."""
    import dataclasses

    from a3jax.checkpoint import export_run, load_params, save_params
    from a3jax.convert.hf import from_hf, to_hf

    if not os.path.exists(os.path.join(out, "pretrain", "final", "model.yaml")):
        export_run(os.path.join(out, "pretrain"), os.path.join(out, "pretrain", "final"))
    cfg, params = load_params(os.path.join(out, "pretrain", "final"), host=True)
    to_hf(dataclasses.replace(cfg, objective="a3"), params, os.path.join(out, "hf"))
    cfg2, params2 = from_hf(os.path.join(out, "hf"))
    save_params(os.path.join(out, "base"), cfg2, params2, force=True)


def adapt_sweep(args) -> int:
    import hashlib

    from a3jax.demo import run
    from a3jax.train.metrics import read_metrics

    cache = args.cache
    rows = []
    for name, (pre, ad) in ADAPT_CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        key = hashlib.sha1(json.dumps(pre).encode()).hexdigest()[:10]
        base = os.path.join(cache, f"pre_{key}")
        out = os.path.join(cache, name)
        shutil.rmtree(out, ignore_errors=True)
        if os.path.isdir(os.path.join(base, "pretrain")):
            # only the pretrained run: the export and conversions run again with this checkout's code
            shutil.copytree(os.path.join(base, "pretrain"), os.path.join(out, "pretrain"), symlinks=True)
        if name.endswith("-untrainedq") and os.path.isdir(os.path.join(out, "pretrain")):
            _untrained_query_base(out)
        overrides = [f"pretrain:{o}" for o in pre] + [f"adapt:{o}" for o in ad]
        load0 = os.getloadavg()[0]
        t0 = time.time()
        rep = run(os.path.join(ROOT, "configs", "demo"), overrides, out, show=0, parallel_settings=())
        secs = time.time() - t0
        if not os.path.isdir(os.path.join(base, "pretrain")):
            os.makedirs(base, exist_ok=True)
            shutil.copytree(os.path.join(out, "pretrain"), os.path.join(base, "pretrain"), symlinks=True)
        _, evals = read_metrics(os.path.join(out, "adapt"))
        inf, held, ph = rep["infill"], rep["heldout"], rep["phases"]
        row = dict(name=name, pretrain=pre, adapt=ad, seconds=secs, load=[load0, os.getloadavg()[0]],
                   pretrain_steps=ph["pretrain"]["steps"], pretrain_s=ph["pretrain"]["seconds"],
                   pretrain_trained_now=ph["pretrain"]["trained_now"],
                   adapt_steps=ph["adapt"]["steps"], adapt_s=ph["adapt"]["seconds"],
                   adapt_tokens_per_s=ph["adapt"]["tokens_per_s"], eval_s=rep["eval_seconds"],
                   pretrained_ar=held["pretrained"]["ar"]["nats_per_byte"],
                   **{f"a3_{k}": v["nats_per_byte"] for k, v in held["a3"].items()},
                   **{f"exact_{o}": inf[o]["exact_chars"] for o in ("left_to_right", "confidence", "random",
                                                                      "prefix_only")},
                   span_a3=inf["span_nats_per_byte"]["a3_both_sides"],
                   span_prefix=inf["span_nats_per_byte"]["pretrained_prefix_only"],
                   adapt_curve=[(r["step"], r["loss"]) for r in evals], samples=inf["samples"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        prev = json.load(open(args.out)) if os.path.exists(args.out) else dict(rows=[])
        done = {r["name"] for r in rows}
        merged = [r for r in prev["rows"] if r["name"] not in done] + rows
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=merged), f, indent=2)
    print(f"\n{'candidate':<28} {'pre':>5} {'ad':>5} {'ad s':>5} {'LLaMA':>6} {'A3 ar':>6} {'r:4':>6} {'inf':>6} "
          f"{'l2r':>6} {'conf':>6} {'rand':>6} {'pref':>6} {'spanA3':>6} {'spanLM':>6}")
    for r in rows:
        print(f"{r['name']:<28} {r['pretrain_steps']:>5} {r['adapt_steps']:>5} {r['adapt_s']:>5.0f} "
              f"{r['pretrained_ar']:>6.3f} {r['a3_ar']:>6.3f} {r['a3_random:4']:>6.3f} {r['a3_infill']:>6.3f} "
              f"{r['exact_left_to_right']:>6.3f} {r['exact_confidence']:>6.3f} {r['exact_random']:>6.3f} "
              f"{r['exact_prefix_only']:>6.3f} {r['span_a3']:>6.3f} {r['span_prefix']:>6.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--adapt", action="store_true", help="whole demos of ADAPT_CANDIDATES (see the docstring)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "demo_adapt_sweep"),
                    help="--adapt: where the shared pretrained runs and each candidate's demo live")
    ap.add_argument("--keep", action="store_true", help="--adapt: keep each candidate's demo directory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.adapt:
        args.out = args.out or os.path.join(ROOT, "bench", "results", "demo_adapt_sweep.json")
        return adapt_sweep(args)
    args.out = args.out or os.path.join(ROOT, "bench", "results", "demo_sweep.json")

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
