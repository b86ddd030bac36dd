"""`a3jax eval`: local JSONL tasks (--task), HumanEval infilling (--humaneval), ROCStories infilling
(--story), or a named suite of them (--suite); a table of metrics, and JSON."""
from __future__ import annotations

import argparse
import json
import sys
import time

from a3jax import fs
from a3jax.checkpoint import load_params
from a3jax.decode.text import load_tok
from a3jax.eval.tasks import A3Evaluator, TaskError, run_task


def _parser():
    ap = argparse.ArgumentParser(prog="a3jax eval", description="Evaluate a checkpoint (docs/evaluate.md): local "
                                 "JSONL tasks, HumanEval infilling executed in a sandbox, ROCStories infilling, "
                                 "or a named suite of them.")
    ap.add_argument("--task", action="append", default=[], help="task JSONL file (repeatable)")
    ap.add_argument("--humaneval", action="append", default=[],
                    help="HumanEval infilling benchmark: single_line | multi_line | random_span (repeatable)")
    ap.add_argument("--story", default=None, help="ROCStories / Story Cloze CSV (sentence 3 infilled)")
    ap.add_argument("--suite", default=None, help="a suite of a3jax/eval/suites.yaml (or --suites-file)")
    ap.add_argument("--suites-file", default=None, help="YAML file of suites (default: the package's)")
    ap.add_argument("--ckpt", required=True, help="params checkpoint directory")
    ap.add_argument("--tokenizer", default="auto", help="auto (the checkpoint's, else byte) | byte | path")
    ap.add_argument("--limit", type=int, default=None,
                    help="first N examples of each kind / stories; a fixed spread subset of N HumanEval tasks")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch (Engine slots for HumanEval)")
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
                         "adaptation (the AR baseline; left to right only; HumanEval: prefix-only)")
    ap.add_argument("--length", default="given", choices=("given", "budget"),
                    help="HumanEval: the blank has the canonical middle's token count, or --budget tokens")
    ap.add_argument("--budget", type=int, default=64, help="HumanEval --length budget: blank tokens")
    ap.add_argument("--threshold", type=float, default=None, help="HumanEval: dynamic-order commit threshold")
    ap.add_argument("--speculative", type=int, default=0, help="HumanEval: self-speculative draft block k")
    ap.add_argument("--samples", type=int, default=1, help="HumanEval: samples per task (pass@k)")
    ap.add_argument("--temperature", type=float, default=0.0, help="HumanEval: sampling temperature")
    ap.add_argument("--pass-k", type=int, nargs="+", default=[1], help="HumanEval: the k of pass@k")
    ap.add_argument("--exec-workers", type=int, default=2, help="HumanEval: programs run in parallel")
    ap.add_argument("--exec-timeout", type=float, default=10.0, help="HumanEval: seconds per program")
    ap.add_argument("--progress", action="store_true", help="progress bars (stderr)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file ('-' = stdout only)")
    return ap


def cli_main(argv) -> int:
    args = _parser().parse_args(argv)
    if not (args.task or args.humaneval or args.story or args.suite):
        print("a3jax eval: error: give --task, --humaneval, --story or --suite", file=sys.stderr)
        return 2
    if args.humaneval or args.story or args.suite:
        from a3jax.eval.run import ReportError, run_report

        try:
            report = run_report(args)
        except (ReportError, TaskError, ValueError, FileNotFoundError, OSError) as e:
            print(f"a3jax eval: error: {e}", file=sys.stderr)
            return 2
        return _emit_report(report, args.json)
    return _jsonl_only(args)


def _emit_report(report: dict, dest) -> int:
    from a3jax.eval.suite import format_table

    if dest == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if dest:
        fs.write_text(dest, json.dumps(report, indent=2))
        print(f"wrote {dest}", file=sys.stderr)
    return 0


def _jsonl_only(args) -> int:
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
