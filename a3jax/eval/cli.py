"""`a3jax eval --task FILE.jsonl [--task ...] --ckpt CKPT`: a table of metrics, and JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time

from a3jax import fs
from a3jax.checkpoint import load_params
from a3jax.decode.text import load_tok
from a3jax.eval.tasks import A3Evaluator, TaskError, run_task


def cli_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax eval", description="Evaluate on local JSONL tasks (formats: "
                                 "docs/evaluate.md): multiple_choice, infill, qa, perplexity.")
    ap.add_argument("--task", action="append", required=True, help="task JSONL file (repeatable)")
    ap.add_argument("--ckpt", required=True, help="params checkpoint directory")
    ap.add_argument("--tokenizer", default="auto", help="auto (the checkpoint's, else byte) | byte | path")
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each kind")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--order", default="ar", help="perplexity grouping: ar | blocks:k | random:k | ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=1,
                    help="multiple choice / QA: continuation scored / generated in AR groups of this size")
    ap.add_argument("--context-order", default="ar", choices=("ar", "one"),
                    help="multiple choice context: AR (default) or one group")
    ap.add_argument("--infill-order", default="confidence", help="decoding order for infill tasks")
    ap.add_argument("--infill-group-size", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="QA answer length cap")
    ap.add_argument("--stream", default="query", choices=("query", "content"),
                    help="query: A3 (default); content: the causal content stream, i.e. the base LLaMA before "
                         "adaptation (the AR baseline; left to right only)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file ('-' = stdout only)")
    args = ap.parse_args(argv)
    try:
        for path in args.task:
            if not fs.isfile(path):
                raise FileNotFoundError(f"task file not found: {path}")
        tok = load_tok(args.tokenizer, args.ckpt)
        cfg, params = load_params(args.ckpt)
        ev = A3Evaluator(cfg, params, tok, batch_size=args.batch_size, stream=args.stream)
        results = {}
        for path in args.task:
            t0 = time.perf_counter()
            res = run_task(ev, path, limit=args.limit, order=args.order, seed=args.seed,
                           group_size=args.group_size, context_order=args.context_order,
                           infill_order=args.infill_order, infill_group_size=args.infill_group_size,
                           max_new_tokens=args.max_new_tokens)
            for kind, m in res.items():
                m["seconds"] = round(time.perf_counter() - t0, 3)
            results[fs.basename(path)] = res
    except (TaskError, ValueError, FileNotFoundError, OSError) as e:
        print(f"a3jax eval: error: {e}", file=sys.stderr)
        return 2
    out = dict(ckpt=args.ckpt, settings=dict(stream=args.stream, order=args.order, group_size=args.group_size,
                                             context_order=args.context_order, infill_order=args.infill_order,
                                             infill_group_size=args.infill_group_size), results=results)
    if args.json == "-":
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'task':<28} {'kind':<16} {'n':>5}  metrics")
    for name, res in results.items():
        for kind, m in res.items():
            metrics = "  ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("n", "seconds"))
            print(f"{name:<28} {kind:<16} {m['n']:>5}  {metrics}")
    if args.json:
        fs.write_text(args.json, json.dumps(out, indent=2))  # local or gs://
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
