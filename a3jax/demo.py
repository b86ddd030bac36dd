"""`make demo` / `a3jax demo [CONFIG_DIR]`: A3 end to end on the embedded stdlib corpus plus synthetic
any-order tasks (docs/demo.md).

0. corpus     OUT/corpus: the stdlib's source under its own keys + the tasks (a3jax.demo_tasks,
              CONFIG_DIR/tasks.yaml)
1. pretrain   a small LLaMA left to right (train.objective: ar)       CONFIG_DIR/pretrain.yaml
2. export     its params -> a HF LLaMA directory (a3jax convert a3-to-hf) -> back (hf-to-a3), as a
              user starts from a released LLaMA
3. adapt      that model to any order with the curriculum (model.init_from)  CONFIG_DIR/adapt.yaml
4. evaluate   a fixed infilling benchmark on held-out code (A3 in three orders vs prefix-only
              continuation by the pretrained LLaMA), held-out nats/byte, parallel decoding; the same
              comparison on held-out task items, parallel decoding on them; the next commands, run
5. report     OUT/demo_report.json, OUT/loss.png, OUT/parallel.png, OUT/any_order_parallel.png

Every phase is a command a user can rerun by hand; the demo prints them. A rerun resumes every
phase (a finished run trains nothing) and rewrites the report.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import keyword
import os
import platform
import re
import sys
import textwrap
import time
import tokenize

import jax
import numpy as np

from a3jax import demo_tasks, fs
from a3jax.checkpoint import RunCheckpoints, export_run, load_params
from a3jax.config import MeshConfig, load_config
from a3jax.data import SkipStats, load_tokenizer, make_eval_batches
from a3jax.data.rows import blank_rows, placeholder_id, prompt_groups
from a3jax.data.sources import iter_documents
from a3jax.decode import DecodeSpec, SamplingParams, generate, infill
from a3jax.model import param_shapes, param_shardings
from a3jax.score import log_likelihood, score_rows
from a3jax.sharding import make_mesh, rules_of
from a3jax.train.metrics import read_metrics
from a3jax.train.plot import save_png
from a3jax.train.state import abstract_state, make_optimizer, state_shardings
from a3jax.train.trainer import train

ORDERS = ("left_to_right", "confidence", "random")
GROUP_SIZES = (1, 2, 4)
# The settings `make demo` runs on code: the any-order tasks show 2-per-step and the threshold
# (docs/demo.md has every setting's numbers on code; each costs ~10 s of the budget).
CODE_PARALLEL = ("group:1", "group:4", "speculative:4")
THRESHOLD = 0.9
SPECULATIVE = 4
BENCH_SEED = 0  # the benchmark is fixed: the same held-out functions and blanks for every model
BENCH_COUNT = 32
HELDOUT_INFILL = "infill:0.25:8:1"  # context left to right, then the blanks one by one in random order
# The infilling stage (configs/demo/adapt.yaml) trains the context left to right, one token per group,
# so the benchmark decodes and scores it the same way (decoder `prompt_group_size`); the reference's
# default (all known tokens one group) is a layout that stage never shows the model.
CONTEXT_GROUP_SIZE = 1
TRIVIAL_NAMES = {"self", "cls"}  # every method starts with them: no test of context


# ----------------------------------------------------------------------------- phases


def split_overrides(overrides):
    """`pretrain:KEY=V` / `adapt:KEY=V` go to one phase, plain `KEY=V` to both, `tasks:KEY=V` to
    tasks.yaml."""
    pre, ad, tasks = [], [], []
    for ov in overrides:
        if ov.startswith("pretrain:"):
            pre.append(ov[len("pretrain:"):])
        elif ov.startswith("adapt:"):
            ad.append(ov[len("adapt:"):])
        elif ov.startswith("tasks:"):
            tasks.append(ov[len("tasks:"):])
        else:
            pre.append(ov)
            ad.append(ov)
    return pre, ad, tasks


def phase_plan(config_dir: str, overrides, out: str) -> dict:
    """The configs of both training phases and the CLI command of every phase, with the paths under out."""
    for name in ("pretrain.yaml", "adapt.yaml", "tasks.yaml"):
        if not os.path.isfile(os.path.join(config_dir, name)):
            raise FileNotFoundError(f"a3jax demo: {config_dir}/{name} not found (the demo's config directory "
                                    f"holds pretrain.yaml, adapt.yaml and tasks.yaml; default configs/demo)")
    pre_ov, ad_ov, task_ov = split_overrides(overrides)
    d = {k: fs.join(out, k) for k in ("pretrain", "hf", "base", "adapt", "final", "corpus")}
    d["pretrain_final"] = fs.join(d["pretrain"], "final")
    pre_ov = [f"run_dir={d['pretrain']}", f"data.source={d['corpus']}"] + pre_ov
    ad_ov = [f"run_dir={d['adapt']}", f"model.init_from={d['base']}", f"data.source={d['corpus']}"] + ad_ov
    pre_path, ad_path = os.path.join(config_dir, "pretrain.yaml"), os.path.join(config_dir, "adapt.yaml")

    def q(args):
        return " ".join(a if a.replace("=", "").replace("/", "").replace(".", "").replace("_", "").replace(
            ":", "").replace("-", "").isalnum() else repr(a) for a in args)

    commands = dict(
        pretrain=f"a3jax train {q([pre_path] + pre_ov)}",
        export_pretrain=f"a3jax export {d['pretrain']} {d['pretrain_final']}",
        a3_to_hf=f"a3jax convert a3-to-hf --ckpt {d['pretrain_final']} --out {d['hf']}",
        hf_to_a3=f"a3jax convert hf-to-a3 --hf {d['hf']} --out {d['base']} --force",
        adapt=f"a3jax train {q([ad_path] + ad_ov)}",
        export_final=f"a3jax export {d['adapt']} {d['final']}",
    )
    return dict(pretrain=load_config(pre_path, pre_ov), adapt=load_config(ad_path, ad_ov), dirs=d,
                commands=commands, tasks=load_tasks_config(os.path.join(config_dir, "tasks.yaml"), task_ov))


TASKS_KEYS = dict(examples=int, seed=int, eval_count=int, both_count=int)


def load_tasks_config(path: str, overrides=()) -> dict:
    """configs/demo/tasks.yaml (and `KEY=VALUE` overrides): how many task examples the corpus holds
    and the evaluation uses."""
    import yaml

    with open(path) as f:
        got = yaml.safe_load(f) or {}
    for ov in overrides:
        key, eq, value = ov.partition("=")
        if not eq:
            raise ValueError(f"a3jax demo: tasks override {ov!r} is not KEY=VALUE")
        got[key] = yaml.safe_load(value)
    bad = sorted(set(got) - set(TASKS_KEYS))
    if bad:
        raise ValueError(f"{path}: unknown key(s) {bad} (known: {sorted(TASKS_KEYS)})")
    for k, typ in TASKS_KEYS.items():
        if k not in got:
            raise ValueError(f"{path}: missing key {k!r}")
        low = 0 if k == "seed" else 1
        if not isinstance(got[k], typ) or isinstance(got[k], bool) or got[k] < low:
            raise ValueError(f"{path}: {k} must be an integer >= {low}, got {got[k]!r}")
    return got


def write_corpus(plan: dict) -> dict:
    """OUT/corpus: the standard library's source under its own keys and the task examples."""
    from a3jax.data.sources import resolve_files

    t0 = time.time()
    root, files = resolve_files("stdlib")
    examples = demo_tasks.training_examples(plan["tasks"]["examples"], plan["tasks"]["seed"])
    demo_tasks.write_corpus(plan["dirs"]["corpus"], [(os.path.relpath(p, root), p) for p in files], examples)
    print(f"\n== 0. corpus: {len(files)} stdlib files + {len(examples)} task examples -> {plan['dirs']['corpus']}",
          flush=True)
    plan["task_examples"] = examples  # the evaluation excludes every one of them
    return dict(seconds=time.time() - t0, code_files=len(files), task_examples=len(examples),
                dir=plan["dirs"]["corpus"])


def final_params(cfg):
    """Params of the run's latest checkpoint, on one device."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = rules_of(cfg.mesh)
    optimizer, _ = make_optimizer(cfg.train.optimizer, cfg.total_steps)
    psh = param_shardings(cfg.model, mesh, rules)
    ssh = state_shardings(optimizer, psh, param_shapes(cfg.model), mesh)
    ckpts = RunCheckpoints(cfg.run_dir, cfg.checkpoint, log=lambda m: None)
    try:
        step = ckpts.latest_step()
        if step is None:
            raise RuntimeError(f"no checkpoint under {cfg.run_dir}/checkpoints")
        state = ckpts.restore_state(step, abstract_state(optimizer, param_shapes(cfg.model), ssh))
    finally:
        ckpts.close()
    return state.params


def train_phase(name: str, cfg, command: str) -> tuple[dict, bool]:
    print(f"\n== {name}: {command}", flush=True)
    t0 = time.time()
    res = train(cfg, progress_bar=False)
    if res.get("interrupted"):  # SIGINT/SIGTERM: train saved a checkpoint; stop, a rerun resumes here
        print(f"   interrupted at step {res['step']}: rerun the demo to resume", flush=True)
        raise SystemExit(128 + int(res["interrupted"]))
    recs, _ = read_metrics(cfg.run_dir)
    trained = res.get("resumed_from") != cfg.total_steps  # False: a finished run, nothing trained now
    tokens = cfg.total_steps * cfg.train.global_batch_size * cfg.data.seq_len
    tps = sorted(r["tokens_per_s"] for r in recs if r.get("tokens_per_s"))
    info = dict(steps=cfg.total_steps, tokens=tokens, seconds=time.time() - t0,
                final_train_loss=recs[-1]["loss"] if recs else None, trained_now=trained,
                tokens_per_s=tps[len(tps) // 2] if tps else None, run_dir=cfg.run_dir,
                stages=[f"{s.strategy}x{s.steps}" for s in cfg.data.stages], objective=cfg.train.objective)
    return info, trained


def convert(argv: list[str]) -> None:
    from a3jax.convert.cli import cli_main as convert_main  # the `a3jax convert` command itself

    rc = convert_main(argv + ["--no-progress"] if argv[0] == "hf-to-a3" else argv)
    if rc:
        raise RuntimeError(f"a3jax convert {' '.join(argv)} exited with status {rc}")


def run_phases(plan: dict) -> dict:
    d, cmds = plan["dirs"], plan["commands"]
    phases = {}
    phases["pretrain"], fresh = train_phase("1. pretrain (ar)", plan["pretrain"], cmds["pretrain"])
    t0 = time.time()
    steps = [("export_pretrain", lambda: export_run(d["pretrain"], d["pretrain_final"]), d["pretrain_final"]),
             ("a3_to_hf", lambda: convert(["a3-to-hf", "--ckpt", d["pretrain_final"], "--out", d["hf"]]), d["hf"]),
             ("hf_to_a3", lambda: convert(["hf-to-a3", "--hf", d["hf"], "--out", d["base"], "--force"]), d["base"])]
    for key, fn, path in steps:
        done = fs.exists(fs.join(path, "config.json" if key == "a3_to_hf" else "model.yaml"))
        fresh = fresh or not done
        print(f"\n== 2. {cmds[key]}" + ("" if fresh else "   (done: kept)"), flush=True)
        if fresh:
            fn()
    phases["export"] = dict(seconds=time.time() - t0, hf_dir=d["hf"], base=d["base"])
    if fresh and fs.exists(fs.join(d["adapt"], "checkpoints")):
        print(f"   note: {d['adapt']} has checkpoints adapted from an earlier base; they are resumed. Delete "
              f"{d['adapt']} to adapt the new one.", flush=True)
    phases["adapt"], fresh_ad = train_phase("3. adapt to A3 (curriculum)", plan["adapt"], cmds["adapt"])
    if fresh_ad or fresh or not fs.exists(fs.join(d["final"], "model.yaml")):
        export_run(d["adapt"], d["final"])
    print(f"   final params -> {d['final']}   ({cmds['export_final']})", flush=True)
    return phases


# ----------------------------------------------------------------------------- the infilling benchmark


def _spans(src: str):
    """Candidate blanks of one function: (kind, start, end) character offsets.
    name: the first occurrence of an identifier that occurs again later (a parameter, a local) - the
          prefix cannot know it, the rest of the function uses it.
    args: the text between the parentheses of a one-line call or def line, every name in it used
          elsewhere in the function, the closing parenthesis given."""
    starts = np.cumsum([0] + [len(l) for l in src.splitlines(keepends=True)])
    off = lambda rc: int(starts[rc[0] - 1] + rc[1])  # noqa: E731
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    names = [(t.string, off(t.start), off(t.end)) for t in toks
             if t.type == tokenize.NAME and not keyword.iskeyword(t.string)]
    out, seen = [], set()
    for i, (s, a, b) in enumerate(names):
        # not even inside a string or comment of the prefix: only the right context has it
        if s not in seen and s not in TRIVIAL_NAMES and 3 <= len(s) <= 12 and any(n[0] == s for n in names[i + 1:]) \
                and not re.search(rf"\b{s}\b", src[:a]):
            out.append(("name", a, b))
        seen.add(s)
    for i, t in enumerate(toks[:-1]):
        if t.type == tokenize.NAME and toks[i + 1].string == "(":
            depth, j = 0, i + 1
            for j in range(i + 1, len(toks)):
                depth += toks[j].string == "("
                depth -= toks[j].string == ")"
                if depth == 0:
                    break
            a, b = off(toks[i + 1].end), off(toks[j].start)
            inner = src[a:b]
            if not 3 <= len(inner) <= 16 or "\n" in inner or "(" in inner or inner != inner.strip():
                continue
            rest = src[:a] + src[b:]
            inner_names = [n for n, x, y in names if a <= x < b]
            if inner_names and all(any(n == m and not a <= x < b for m, x, _ in names) for n in inner_names) \
                    and all(n in rest for n in inner_names):
                out.append(("args", a, b))
    return out


def infill_benchmark(max_len: int, heldout_fraction: float, count: int = BENCH_COUNT, seed: int = BENCH_SEED) -> list[dict]:
    """The fixed benchmark: `count` functions from the held-out stdlib files (ASCII, BOS + text + EOS
    fit max_len), one blank each, half `name` and half `args` spans where both exist (docs/demo.md)."""
    funcs = []
    for key, text in iter_documents("stdlib", "text", "heldout", heldout_fraction, SkipStats()):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            src = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
            if not src.isascii() or len(src) + 2 > max_len or len(src) < 48:
                continue
            spans = _spans(src)
            if spans:
                funcs.append((key, node.name, src, spans))
    if not funcs:
        raise RuntimeError("no held-out functions found for the infilling benchmark")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(funcs), size=min(count, len(funcs)), replace=False)
    items = []
    for n, i in enumerate(sorted(idx)):
        key, fname, src, spans = funcs[i]
        kinds = sorted({k for k, _, _ in spans})
        kind = kinds[n % len(kinds)] if len(kinds) > 1 else kinds[0]
        pick = [s for s in spans if s[0] == kind]
        _, a, b = pick[int(rng.integers(len(pick)))]
        items.append(dict(file=key, function=fname, kind=kind, text=src, start=a, end=b))
    return items


def _score(items, fills, scorer) -> dict:
    exact, total, spans, rouge = 0, 0, 0, []
    for it, got in zip(items, fills):
        truth = it["text"][it["start"]:it["end"]]
        exact += sum(a == c for a, c in zip(got, truth))
        total += len(truth)
        spans += got == truth
        rouge.append(scorer.score(truth, got)["rougeL"].fmeasure)
    return dict(exact_chars=exact / max(total, 1), exact_spans=spans / max(len(items), 1),
                rougeL=float(np.mean(rouge)))


def _rows(tok, items):
    return [([tok.bos_id] + list(tok.encode(it["text"])), 1 + it["start"], it["end"] - it["start"]) for it in items]


def a3_fill(cfg, params, tok, items, **kw):
    """A3 infill of the benchmark's blanks (prefix and suffix visible): (fills, DecodeResult, seconds)."""
    rows = _rows(tok, items)
    t = max(len(r[0]) for r in rows)
    place = placeholder_id(tok)
    tokens, known, valid = blank_rows(rows, t, tok.pad_id, place)
    t0 = time.time()
    kw.setdefault("prompt_group_size", CONTEXT_GROUP_SIZE)
    res = infill(cfg, params, tokens, known, DecodeSpec(**kw), SamplingParams(seed=0), valid)
    secs = time.time() - t0
    fills = [tok.decode(res.tokens[r, s:s + n].tolist()) for r, (_, s, n) in enumerate(rows)]
    checks = dict(unfilled=int((res.tokens[~known & valid] == place).sum()),
                  changed_known=int((res.tokens[known & valid] != tokens[known & valid]).sum()))
    return fills, res, secs, checks


def prefix_fill(cfg, params, tok, items):
    """What a plain LM can do: greedy continuation of the prefix, as many tokens as the blank has."""
    rows = _rows(tok, items)
    prompts = [ids[:s] for ids, s, _ in rows]
    new = generate(cfg, params, prompts, max(n for _, _, n in rows), DecodeSpec(stop_at_eos=False)).new
    return [tok.decode(new[r, :n].tolist()) for r, (_, _, n) in enumerate(rows)]


def span_nll(pre_cfg, pre_params, cfg, params, tok, items) -> dict:
    """Exact nats/byte of the blanked spans: A3 given prefix and suffix (the context grouped as the
    decoder groups it, then the span left to right), the pretrained LLaMA given the prefix only."""
    a3_rows, ar_rows, n = [], [], 0
    for ids, s, k in _rows(tok, items):
        ids = np.asarray(ids)
        known = np.ones(len(ids), bool)
        known[s:s + k] = False
        g = prompt_groups(known, CONTEXT_GROUP_SIZE).astype(np.int32)
        g[s:s + k] = g[known].max() + 1 + np.arange(k)
        tgt = np.zeros(len(ids), bool)
        tgt[s:s + k] = True
        a3_rows.append((ids, g, tgt))
        ar_rows.append((ids[:s + k], np.arange(s + k, dtype=np.int32), tgt[:s + k]))
        n += k
    a3 = sum(v for v, _ in score_rows(cfg, params, a3_rows, pad_id=tok.pad_id))
    ar = sum(v for v, _ in score_rows(pre_cfg, pre_params, ar_rows, pad_id=tok.pad_id))
    return dict(a3_both_sides=-a3 / n, pretrained_prefix_only=-ar / n, bytes=n)


def highlight(it, fill: str) -> str:
    """The lines around the blank with the fill between >>> and <<<."""
    src = it["text"]
    a = src.rfind("\n", 0, it["start"]) + 1
    b = src.find("\n", it["end"])
    b = len(src) if b < 0 else b
    return src[a:it["start"]] + ">>>" + fill + "<<<" + src[it["end"]:b]


def infill_section(pre_cfg, pre_params, cfg, params, tok, items, show: int) -> dict:
    from rouge_score import rouge_scorer  # deferred: rouge_score imports nltk (~2 s)

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    fills, out = {}, {}
    for order in ORDERS:
        fills[order], _, _, checks = a3_fill(cfg, params, tok, items, order=order, group_size=1)
        out[order] = dict(_score(items, fills[order], scorer), **checks)
    fills["prefix_only"] = prefix_fill(pre_cfg, pre_params, tok, items)
    out["prefix_only"] = _score(items, fills["prefix_only"], scorer)
    out["span_nats_per_byte"] = span_nll(pre_cfg, pre_params, cfg, params, tok, items)
    out["benchmark"] = dict(count=len(items), seed=BENCH_SEED, kinds={k: sum(it["kind"] == k for it in items)
                                                                      for k in ("name", "args")},
                            blank_bytes=int(sum(it["end"] - it["start"] for it in items)))
    out["samples"] = [dict(file=it["file"], function=it["function"], kind=it["kind"],
                           truth=it["text"][it["start"]:it["end"]], **{o: fills[o][i] for o in fills})
                      for i, it in enumerate(items)]
    print(f"\n   {show} of {len(items)} examples (>>>A3 confidence fill<<<; truth and prefix-only below):")
    for i, it in enumerate(items[:show]):
        print(f"   [{it['kind']}] {it['file']}:{it['function']}\n"
              f"      A3      | {highlight(it, fills['confidence'][i])}\n"
              f"      truth   | {highlight(it, it['text'][it['start']:it['end']])}\n"
              f"      prefix  | {highlight(it, fills['prefix_only'][i])}")
    return out


# ----------------------------------------------------------------------------- likelihood


def heldout_nll(cfg, params, data_cfg, strategy: str, batches: int, batch_size: int = 8) -> dict:
    ll, n = 0.0, 0
    for batch in make_eval_batches(data_cfg, batch_size, strategy, batches):
        mask = batch["loss_mask"].astype(bool)
        ll += float(np.sum(log_likelihood(cfg, params, batch["tokens"], batch["groups"], batch["segment_ids"],
                                          mask, positions=batch["positions"])))
        n += int(mask.sum())
    # byte tokenizer: one token per byte (a document's EOS counts as one)
    return dict(nats_per_byte=-ll / n, bits_per_byte=-ll / n / np.log(2), tokens=n, strategy=strategy)


def heldout_section(pre, pre_params, ad, params, batches: int) -> dict:
    """On the held-out code (the corpus's code files are the stdlib's, under the same keys): the same
    rows as before the tasks joined the corpus."""
    pre_data, ad_data = (dataclasses.replace(c.data, source="stdlib") for c in (pre, ad))
    return dict(pretrained=dict(ar=heldout_nll(pre.model, pre_params, pre_data, "ar", batches)),
                a3={name: heldout_nll(ad.model, params, ad_data, strat, batches)
                    for name, strat in (("ar", "ar"), ("random:4", "random:4"), ("infill", HELDOUT_INFILL))})


# ----------------------------------------------------------------------------- parallel decoding


def _timed(fn):
    fn()  # compile (and warm the cache) first: tokens/s is the steady state
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


def parallel_section(cfg, params, tok, items, group_sizes, gen_prompts: int, gen_tokens: int,
                     only=None) -> dict:
    """The paper's Figure 3 in small, on the benchmark's blanks (exact chars) and on continuations of
    held-out prompts (NLL of the output under the model's own left-to-right factorisation)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    settings = [(f"group:{g}", dict(order="confidence", group_size=g), dict(order="left_to_right", group_size=g))
                for g in group_sizes]
    settings.append((f"threshold:{THRESHOLD}", dict(order="confidence", group_size=1, threshold=THRESHOLD),
                     dict(order="confidence", group_size=1, threshold=THRESHOLD)))
    settings.append((f"speculative:{SPECULATIVE}", dict(order="left_to_right", speculative=SPECULATIVE),
                     dict(order="left_to_right", speculative=SPECULATIVE)))
    settings = [s for s in settings if only is None or s[0] in only]
    prompts = [[tok.bos_id] + list(tok.encode(it["text"][:48])) for it in items[:gen_prompts]]
    blanks = sum(it["end"] - it["start"] for it in items)
    out = {}
    for name, fkw, gkw in settings:
        t0 = time.time()
        (fills, res, _, _), secs = _timed(lambda: a3_fill(cfg, params, tok, items, **fkw))
        # the prompt as one group, the layout these numbers have always been measured with
        gres, gsecs = _timed(lambda: generate(cfg, params, prompts, gen_tokens, DecodeSpec(
            stop_at_eos=False, prompt_group_size=0, **gkw), SamplingParams(seed=0)))
        new = gres.new
        rows = [(np.asarray(p + new[r].tolist()), np.arange(len(p) + gen_tokens, dtype=np.int32),
                 np.arange(len(p) + gen_tokens) >= len(p)) for r, p in enumerate(prompts)]
        ll = sum(v for v, _ in score_rows(cfg, params, rows, pad_id=tok.pad_id))
        out[name] = dict(steps=int(res.num_steps), tokens_per_s=blanks / secs,
                         exact_chars=_score(items, fills, scorer)["exact_chars"],
                         generate=dict(steps=int(gres.num_steps), tokens_per_s=len(prompts) * gen_tokens / gsecs,
                                       nll_per_token=-ll / (len(prompts) * gen_tokens), tokens=gen_tokens,
                                       prompts=len(prompts)),
                         seconds=time.time() - t0)  # compiles included
    return out


def plot_parallel(par: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in par.items():
        axes[0].scatter(r["steps"], r["exact_chars"], s=30)
        axes[0].annotate(name, (r["steps"], r["exact_chars"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        g = r["generate"]
        axes[1].scatter(g["steps"], g["nll_per_token"], s=30)
        axes[1].annotate(name, (g["steps"], g["nll_per_token"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="decode steps (model passes)", ylabel="exact chars", title="infill benchmark")
    axes[1].set(xlabel="decode steps (model passes)", ylabel="NLL/token (own AR factorisation)",
                title="continuations")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_png(fig, out)


def plot_phases(phases: list[tuple[str, str]], out: str) -> str:
    """Both phases' training and held-out losses on one step axis: the phase boundary solid, the
    curriculum's stage boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    offset = 0
    for name, run_dir in phases:
        recs, evals = read_metrics(run_dir)
        if not recs:
            continue
        ax.plot([offset + r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2, label=f"{name}: train loss")
        for r0, r1 in zip(recs, recs[1:]):
            if r1.get("stage") != r0.get("stage"):
                ax.axvline(offset + r0["step"], color="gray", ls="--", lw=0.7)
                ax.text(offset + r0["step"], 0.98, f" {r1.get('strategy')}", transform=ax.get_xaxis_transform(),
                        va="top", fontsize=7, color="gray")
        for strat in sorted({k for r in evals for k in r.get("loss", {})}):
            pts = [(offset + r["step"], r["loss"][strat]) for r in evals if strat in r.get("loss", {})]
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=f"{name}: held-out {strat}")
        if offset:
            ax.axvline(offset, color="black", lw=1.2)
            ax.text(offset, 0.9, f" {name}", transform=ax.get_xaxis_transform(), fontsize=8)
        offset += recs[-1]["step"]
    ax.set(xlabel="step (phases end to end)", ylabel="loss (nats/byte)", title="make demo")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_png(fig, out)


# ----------------------------------------------------------------------------- the demo


TARGETS = dict(heldout_ar_max=1.8, infill_ratio_min=1.5, infill_exact_min=0.40, seconds_max=600)


def run(config_dir: str = "configs/demo", overrides=(), out: str = "runs/demo", infill_count: int = BENCH_COUNT,
        show: int = 8, eval_batches: int = 4, group_sizes=GROUP_SIZES, gen_prompts: int = 8,
        gen_tokens: int = 32, parallel_settings=CODE_PARALLEL, any_order_settings=None) -> dict:
    """The whole demo (docs/demo.md); returns the report. parallel_settings: names of the parallel
    decoding settings to run on code (default CODE_PARALLEL; None in parallel_section: group:G for
    group_sizes, threshold:0.9, speculative:4); any_order_settings: those on the tasks (default all)."""
    t0 = time.time()
    load0 = os.getloadavg()[0]
    plan = phase_plan(config_dir, list(overrides), out)
    print("== the demo's phases (each can be rerun by hand):")
    for k, c in plan["commands"].items():
        print(f"   {k:<16} {c}")
    corpus = write_corpus(plan)
    phases = run_phases(plan)
    phases["corpus"] = corpus
    pre, ad = plan["pretrain"], plan["adapt"]
    pre_cfg, pre_params = load_params(plan["dirs"]["pretrain_final"])
    cfg, params = load_params(plan["dirs"]["final"])
    tok = load_tokenizer(ad.data.tokenizer)
    t_eval = time.time()
    timings = {}

    def lap(name, t=[t_eval]):  # seconds of each evaluation section, in the report
        now = time.time()
        timings[name] = now - t[0]
        t[0] = now

    items = infill_benchmark(ad.data.seq_len, ad.data.heldout_fraction, infill_count)
    lap("benchmark")
    print(f"\n== 4. infilling benchmark: {len(items)} held-out functions, one blank each "
          f"({sum(it['end'] - it['start'] for it in items)} bytes)", flush=True)
    inf = infill_section(pre_cfg, pre_params, cfg, params, tok, items, show)
    lap("infill")
    print("\n== 5. held-out nats/byte", flush=True)
    held = heldout_section(pre, pre_params, ad, params, eval_batches)
    lap("heldout")
    print("\n== 6. parallel decoding", flush=True)
    par = parallel_section(cfg, params, tok, items, group_sizes, gen_prompts, gen_tokens, parallel_settings)
    lap("parallel")

    print("\n== 7. any-order tasks (held-out examples, never trained on)", flush=True)
    tcfg = plan["tasks"]
    seen = set(plan["task_examples"])
    t_items = demo_tasks.eval_items(tcfg["eval_count"], tcfg["seed"], seen)
    anyo = demo_tasks.any_order_section(pre_cfg, pre_params, cfg, params, tok, t_items, CONTEXT_GROUP_SIZE)
    lap("any_order")
    both = demo_tasks.both_items(tcfg["both_count"], tcfg["seed"], seen | {it["text"] for it in t_items})
    apar = demo_tasks.parallel_section(cfg, params, tok, t_items, both, CONTEXT_GROUP_SIZE, any_order_settings)
    lap("any_order_parallel")

    nxt = run_next_commands(plan["dirs"]["final"])
    lap("next_commands")

    loss_png = plot_phases([("pretrain (ar)", plan["dirs"]["pretrain"]), ("adapt (a3)", plan["dirs"]["adapt"])],
                           fs.join(out, "loss.png"))
    par_png = plot_parallel(par, fs.join(out, "parallel.png"))
    any_png = demo_tasks.plot_parallel(apar, fs.join(out, "any_order_parallel.png"))
    lap("plots")
    print("   evaluation seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    seconds = time.time() - t0
    ratio = inf["confidence"]["exact_chars"] / max(inf["prefix_only"]["exact_chars"], 1e-9)
    targets = dict(TARGETS, heldout_ar=held["a3"]["ar"]["nats_per_byte"], infill_ratio=ratio,
                   infill_exact=inf["confidence"]["exact_chars"], seconds=seconds)
    targets["met"] = dict(heldout_ar=targets["heldout_ar"] <= TARGETS["heldout_ar_max"],
                          infill_ratio=ratio >= TARGETS["infill_ratio_min"],
                          infill_exact=targets["infill_exact"] >= TARGETS["infill_exact_min"],
                          seconds=seconds <= TARGETS["seconds_max"])

    print(f"\n{'infill (same blanks)':<22} {'exact chars':>11} {'exact spans':>11} {'ROUGE-L':>8}")
    for o in ORDERS + ("prefix_only",):
        r = inf[o]
        print(f"{('A3 ' + o) if o != 'prefix_only' else 'LLaMA prefix-only':<22} {r['exact_chars']:>11.3f} "
              f"{r['exact_spans']:>11.3f} {r['rougeL']:>8.3f}")
    s = inf["span_nats_per_byte"]
    print(f"span nats/byte: A3 given both sides {s['a3_both_sides']:.3f}, LLaMA given the prefix "
          f"{s['pretrained_prefix_only']:.3f}")
    print(f"\n{'held-out nats/byte':<22} {'':>8}\n{'LLaMA (ar)':<22} {held['pretrained']['ar']['nats_per_byte']:>8.3f}")
    for k, r in held["a3"].items():
        print(f"{'A3 ' + k:<22} {r['nats_per_byte']:>8.3f}")
    print(f"\n{'parallel decoding':<18} {'steps':>6} {'tok/s':>8} {'exact':>6} | {'gen steps':>9} "
          f"{'gen tok/s':>9} {'gen NLL':>8}")
    for k, r in par.items():
        g = r["generate"]
        print(f"{k:<18} {r['steps']:>6} {r['tokens_per_s']:>8.0f} {r['exact_chars']:>6.3f} | {g['steps']:>9} "
              f"{g['tokens_per_s']:>9.0f} {g['nll_per_token']:>8.3f}")
    targets["any_order"] = any_order_targets(anyo)
    print_any_order(anyo, apar)
    met = targets["met"]
    print(f"\ntargets: held-out AR {targets['heldout_ar']:.3f} <= 1.8 {'ok' if met['heldout_ar'] else 'MISSED'}; "
          f"confidence/prefix-only {ratio:.2f}x >= 1.5 {'ok' if met['infill_ratio'] else 'MISSED'}; "
          f"exact chars {targets['infill_exact']:.3f} >= 0.40 {'ok' if met['infill_exact'] else 'MISSED'}; "
          f"{seconds:.0f} s <= 600 {'ok' if met['seconds'] else 'MISSED'}")

    report = dict(seconds=seconds, eval_seconds=timings, phases=phases, commands=plan["commands"],
                  heldout=held, infill=inf, parallel=par, any_order=anyo, any_order_parallel=apar, next_commands=nxt,
                  targets=targets,
                  loss_png=loss_png, parallel_png=par_png, any_order_png=any_png,
                  final_checkpoint=plan["dirs"]["final"], pretrained_checkpoint=plan["dirs"]["pretrain_final"],
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(), backend=jax.default_backend(),
                               load_start=load0, load_end=os.getloadavg()[0]))
    report_path = fs.join(out, "demo_report.json")
    fs.write_text(report_path, json.dumps(report, indent=2, default=str))
    print(f"\nloss curves: {loss_png}\nparallel decoding: {par_png}, {any_png}\nreport: {report_path}\n\n"
          "try, on the demo's A3 model:")
    for r in nxt:
        print(f"   {r['command']}\n      " + r["output"].rstrip("\n").replace("\n", "\n      ")
              + ("" if r["sensible"] else "\n      (NOT SENSIBLE: see docs/demo.md)"))
    return report


def next_commands(final: str) -> list[tuple[str, str]]:
    """What a newcomer runs next on the demo's A3 model, (kind, command): an infill that only the right
    context decides (the tag task's format, a name it never saw), a sampled code continuation, a score
    (a word's mirror against a copy)."""
    return [("infill", f"a3jax infill --ckpt {final} --text '<[MASK:4]>abc</span>' --order confidence"),
            ("generate", f"a3jax generate --ckpt {final} --prompt 'def ' --max-new-tokens 48 --temperature 0.8 "
                         f"--seed 0"),
            ("score", f"a3jax score --ckpt {final} --text 'stressed=desserts' --text 'stressed=stressed' "
                      f"--grouping random:4")]


def sensible(kind: str, output: str) -> bool:
    """Whether a next command's output is what a newcomer should see: the infill names the element
    `span` (read from its closer); the continuation is printable code-like text (ASCII, a third or more
    non-blank); the mirror scores higher than the copy."""
    if kind == "infill":
        return output.strip() == "<span>abc</span>"
    if kind == "generate":
        text = output.rstrip("\n")
        return text.startswith("def ") and text.isascii() and all(c.isprintable() or c in "\n\t" for c in text) \
            and sum(not c.isspace() for c in text) >= len(text) / 3 and len(text) > len("def ") + 8
    if kind == "score":
        rows = [l.split() for l in output.splitlines() if re.match(r"^\s*\d+\s", l)]
        return len(rows) == 2 and float(rows[0][2]) > float(rows[1][2])
    raise ValueError(f"unknown next-command kind {kind!r}")


def run_next_commands(final: str) -> list[dict]:
    """Runs the next commands as the CLI does and records each output and whether it is sensible."""
    import contextlib
    import shlex

    from a3jax.decode.cli import generate_main, infill_main  # what `a3jax infill` / `generate` run
    from a3jax.decode.score_cli import score_main  # what `a3jax score` runs

    mains = dict(infill=infill_main, generate=generate_main, score=score_main)
    out = []
    for kind, cmd in next_commands(final):
        argv = shlex.split(cmd)
        if argv[:2] != ["a3jax", kind]:
            raise ValueError(f"next command {cmd!r} is not `a3jax {kind}`")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = mains[kind](argv[2:] + (["--color", "never"] if kind != "score" else []))
        out.append(dict(kind=kind, command=cmd, rc=rc, output=buf.getvalue(),
                        sensible=bool(rc == 0 and sensible(kind, buf.getvalue()))))
    return out


def any_order_targets(anyo: dict) -> dict:
    """Per task: A3 (confidence order) on right-context blanks at least 3x the prefix-only LLaMA and
    at least 0.40 above chance."""
    out = {}
    for task, r in anyo.items():
        rc = r["right_context"]
        a3, lm, ch = rc["exact_match"]["confidence"], rc["exact_match"]["prefix_only"], rc["chance"]
        out[task] = dict(a3=a3, prefix_only=lm, chance=ch, met=bool(a3 >= 3 * lm and a3 >= ch + 0.40))
    return out


def print_any_order(anyo: dict, apar: dict) -> None:
    print(f"\n{'any-order tasks: exact match':<34} {'A3 l-to-r':>9} {'A3 conf':>8} {'A3 random':>9} "
          f"{'LLaMA prefix':>12} {'chance':>8}")
    for task, r in anyo.items():
        for kind, k in r.items():
            e = k["exact_match"]
            print(f"{task + ' ' + kind:<34} {e['left_to_right']:>9.2f} {e['confidence']:>8.2f} {e['random']:>9.2f} "
                  f"{e['prefix_only']:>12.2f} {k['chance']:>8.2g}")
        s = r["right_context"]["samples"][0]
        print(f"   e.g. {s['text']}: answer {s['answer']!r}, A3 {s['confidence']!r}, LLaMA {s['prefix_only']!r}")
    print(f"\n{'parallel (tasks)':<16} {'exact':>6} {'passes':>7} {'tokens':>6} | {'both agree':>10} {'passes':>7}")
    for name, r in apar.items():
        b = r["both"]
        print(f"{name:<16} {r['exact_match']:>6.2f} {r['passes']:>7.2f} {r['tokens']:>6.2f} | "
              f"{b['consistent']:>10.2f} {b['passes']:>7.2f}")


def cli_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="a3jax demo", description=__doc__.splitlines()[0])
    ap.add_argument("config_dir", nargs="?", default="configs/demo",
                    help="directory with pretrain.yaml and adapt.yaml (default configs/demo)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides for both phases; "
                    "pretrain:key=value or adapt:key=value for one; tasks:key=value for tasks.yaml")
    ap.add_argument("--out", default="runs/demo", help="where every phase writes (default runs/demo)")
    ap.add_argument("--infill-count", type=int, default=BENCH_COUNT)
    ap.add_argument("--show", type=int, default=8, help="infill examples printed")
    args = ap.parse_intermixed_args(argv)
    run(args.config_dir, args.overrides, args.out, args.infill_count, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
