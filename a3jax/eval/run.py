"""Runs a list of evaluation tasks (a suite, or the ones named on the command line) on one checkpoint
and returns the report of a3jax.eval.suite: each task's command, settings, metrics and seconds."""
from __future__ import annotations

import time

from a3jax.checkpoint import load_params
from a3jax.decode.engine import Engine
from a3jax.decode.text import load_tok
from a3jax.eval import code_infill, humaneval, story, suite
from a3jax.sandbox import Limits, Sandbox
from a3jax.eval.tasks import A3Evaluator, eval_infill, run_task


class ReportError(ValueError):
    pass


def _cli_tasks(args) -> list:
    """The tasks the command line names, with its settings."""
    out = [dict(name=f"humaneval-{b}", kind="humaneval", benchmark=b, length=args.length, budget=args.budget,
                order=args.infill_order, group_size=args.infill_group_size, threshold=args.threshold,
                speculative=args.speculative, samples=args.samples, temperature=args.temperature,
                ks=list(args.pass_k), seed=args.seed) for b in args.humaneval]
    if args.story:
        out.append(dict(name="story", kind="story", order=args.infill_order, group_size=args.infill_group_size))
    if args.task:
        out.append(dict(name="jsonl", kind="jsonl"))
    return out


def _limit(task_limit, cli_limit):
    limits = [x for x in (task_limit, cli_limit) if x is not None]
    return min(limits) if limits else None


def run_report(args) -> dict:
    if args.suite:
        tasks = suite.suite_tasks(args.suite, args.suites_file or suite.SUITES_FILE)
    else:
        tasks = _cli_tasks(args)
    for b in args.humaneval:
        if b not in humaneval.BENCHMARKS:
            raise ReportError(f"--humaneval {b!r}: choose from {humaneval.BENCHMARKS}")
    tok = load_tok(args.tokenizer, args.ckpt)
    cfg, params = load_params(args.ckpt)
    common = dict(tokenizer=args.tokenizer, stream=args.stream, batch_size=args.batch_size)
    state = {}
    rows = []
    for task in tasks:
        task = dict(task, limit=_limit(task.get("limit"), args.limit))
        kind = task["kind"]
        if kind == "story" and not args.story or kind == "jsonl" and not args.task:
            continue  # a suite's optional part whose data was not given
        t0 = time.perf_counter()
        if kind == "humaneval":
            if "engine" not in state:
                state["engine"] = Engine(cfg, params, tok, slots=args.batch_size)
                state["sandbox"] = Sandbox(Limits(timeout_s=args.exec_timeout, cpu_s=max(1, int(args.exec_timeout))),
                                           workers=args.exec_workers)
            settings = code_infill.FillSettings(
                length=task.get("length", "given"), budget=task.get("budget", 64),
                order=task.get("order", "confidence"), group_size=task.get("group_size", 1),
                threshold=task.get("threshold"), speculative=task.get("speculative", 0),
                stream="content" if args.stream == "content" else None,
                temperature=task.get("temperature", 0.0), samples=task.get("samples", 1), seed=task.get("seed", 0))
            items = humaneval.subset(humaneval.benchmark(task["benchmark"]), task["limit"])
            res = code_infill.evaluate(state["engine"], items, settings, state["sandbox"], ks=task.get("ks") or (1,),
                                       progress=args.progress)
            metrics = {k: v for k, v in res.items() if k.startswith("pass@")}
            rows.append(_row(task, "code_infill", res["n_tasks"], metrics, t0, args, common,
                             dict(fill_settings=dict(vars(settings)), sandbox=state["sandbox"].isolation,
                                  tasks=res["tasks"])))
        else:
            ev = state.get("ev") or A3Evaluator(cfg, params, tok, batch_size=args.batch_size, stream=args.stream)
            state["ev"] = ev
            if kind == "story":
                task["csv"] = args.story
                examples = story.load_stories(args.story, task["limit"])
                m, preds = eval_infill(ev, examples, task.get("order", "confidence"), task.get("group_size", 1))
                rows.append(_row(task, "story_infill", len(examples), m, t0, args, common,
                                 dict(fills=preds[:20])))
            else:
                for path in args.task:
                    res = run_task(ev, path, limit=task["limit"], order=args.order, seed=args.seed,
                                   group_size=args.group_size, context_order=args.context_order,
                                   infill_order=args.infill_order, infill_group_size=args.infill_group_size,
                                   max_new_tokens=args.max_new_tokens)
                    for k, m in res.items():
                        n = m.pop("n")
                        rows.append(_row(dict(task, name=path.rsplit("/", 1)[-1], file=path), k, n, m, t0, args,
                                         common, {}))
    if not rows:
        raise ReportError("nothing to run: the suite's tasks need data that was not given (--story, --task)")
    return suite.make_report(args.suite, args.ckpt, rows)


def _row(task, kind, n, metrics, t0, args, common, extra) -> dict:
    return dict(task=task["name"], kind=kind, n=n, metrics={k: float(v) for k, v in metrics.items()},
                command=suite.command_for(task, args.ckpt, common),
                settings={k: v for k, v in task.items() if k not in ("name",)},
                seconds=round(time.perf_counter() - t0, 3), **extra)
