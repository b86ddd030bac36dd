"""`make demo` / `a3jax demo CONFIG`: the main job on the embedded default corpus.

1. Train the tiny LLaMA from scratch on the Python standard library's source with the byte tokenizer,
   through the curriculum (AR -> contiguous blocks -> random-order groups), with live loss per stage.
   Rerunning resumes from the run's latest checkpoint instead of starting over.
2. Export the final params as a params-only checkpoint (RUN_DIR/final), usable by every CLI command.
3. Infill held-out code: blank a span in a few held-out functions and fill it left-to-right, in random
   order and by confidence; print each beside the truth; report exact-match characters and ROUGE-L.
4. Exact log-likelihood of held-out rows under AR order and under random groups.
5. Loss-curve PNG; everything lands under RUN_DIR (metrics.jsonl, TensorBoard events, demo_report.json).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time

import jax
import numpy as np

from a3jax import fs
from a3jax.checkpoint import RunCheckpoints, save_params
from a3jax.config import MeshConfig, load_config
from a3jax.data import load_tokenizer, make_eval_batches
from a3jax.data.rows import blank_rows, placeholder_id
from a3jax.data.sources import SkipStats, iter_documents
from a3jax.decode import infill
from a3jax.model import param_shapes, param_shardings
from a3jax.score import log_likelihood
from a3jax.sharding import make_mesh, rules_of
from a3jax.train.plot import plot_run
from a3jax.train.state import abstract_state, make_optimizer, state_shardings
from a3jax.train.trainer import train

ORDERS = ("left_to_right", "random", "confidence")


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


def heldout_functions(max_len: int, count: int, heldout_fraction: float = 0.05, seed: int = 0) -> list[dict]:
    """Small functions from the held-out stdlib files: text (ASCII, fits max_len bytes with BOS/EOS)
    and one blanked span: the body's first line after its indentation."""
    found = []
    for _, text in iter_documents("stdlib", "text", "heldout", heldout_fraction, SkipStats()):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno - node.lineno > 6:
                continue
            src = "\n".join(lines[node.lineno - 1:node.end_lineno]) + "\n"
            if not src.isascii() or len(src) + 2 > max_len or len(src) < 40:
                continue
            body = lines[node.body[0].lineno - 1]
            if node.body[0].lineno == node.lineno or ast.get_docstring(node):
                continue
            stripped = body.lstrip()
            if not 6 <= len(stripped) <= 40:
                continue
            start = src.index("\n") + 1 + (len(body) - len(stripped))
            found.append(dict(text=src, start=start, end=start + len(stripped)))
    rng = np.random.default_rng(seed)
    if not found:
        raise RuntimeError("no held-out functions found for the infilling demo")
    idx = rng.choice(len(found), size=min(count, len(found)), replace=False)
    return [found[i] for i in sorted(idx)]


def infill_report(cfg, params, tokenizer, items, group_size: int, show: int):
    from rouge_score import rouge_scorer  # deferred: rouge_score imports nltk (~2 s)

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    t = max(len(it["text"]) for it in items) + 2
    place = placeholder_id(tokenizer)  # blanks hold it: any left unfilled would show
    rows = [([tokenizer.bos_id] + list(tokenizer.encode(it["text"])), 1 + it["start"], it["end"] - it["start"])
            for it in items]  # 1 +: BOS
    tokens, known, valid = blank_rows(rows, t, tokenizer.pad_id, place)
    report = {}
    for order in ORDERS:
        filled = infill(cfg, params, tokens, known, order=order, group_size=group_size, valid=valid, seed=0)
        exact, total, rouge, samples = 0, 0, [], []
        for r, it in enumerate(items):
            truth = it["text"][it["start"]:it["end"]]
            got = tokenizer.decode(filled[r, 1 + it["start"]:1 + it["end"]].tolist())
            exact += sum(a == c for a, c in zip(got, truth))
            total += len(truth)
            rouge.append(scorer.score(truth, got)["rougeL"].fmeasure)
            samples.append(dict(truth=truth, model=got))
            if r < show:
                print(f"  [{order:>13}] truth: {truth!r}\n  {'':>15} model: {got!r}")
        report[order] = dict(exact_chars=exact / max(total, 1), rougeL=float(np.mean(rouge)),
                             unfilled=int((filled[~known] == place).sum()),
                             changed_known=int((filled[known & valid] != tokens[known & valid]).sum()),
                             samples=samples)
    return report


def likelihood_report(cfg, params, data_cfg, batches: int = 2, batch_size: int = 8):
    out = {}
    for strategy in ("ar", "random:4"):
        ll, n = 0.0, 0
        for batch in make_eval_batches(data_cfg, batch_size, strategy, batches):
            ll += float(np.sum(log_likelihood(cfg, params, batch["tokens"], batch["groups"], batch["segment_ids"],
                                              batch["loss_mask"].astype(bool), positions=batch["positions"])))
            n += int(batch["loss_mask"].sum())
        out[strategy] = dict(nats_per_token=-ll / n, bits_per_byte=-ll / n / np.log(2), tokens=n)
    return out


def run(config_path: str, overrides=(), infill_count: int = 16, show: int = 4) -> dict:
    cfg = load_config(config_path, list(overrides))
    t0 = time.time()
    print(f"== 1. training {cfg.run_dir}: {len(cfg.data.stages)} curriculum stages, {cfg.total_steps} steps "
          f"({' -> '.join(f'{s.strategy}x{s.steps}' for s in cfg.data.stages)})", flush=True)
    metrics = train(cfg)
    params = final_params(cfg)
    final_dir = fs.join(cfg.run_dir, "final")
    save_params(final_dir, cfg.model, params, force=True)
    print(f"   final params -> {final_dir}", flush=True)

    tok = load_tokenizer(cfg.data.tokenizer)
    print("== 2. infilling held-out functions (blank = first body line)", flush=True)
    items = heldout_functions(cfg.data.seq_len, infill_count, cfg.data.heldout_fraction)
    infill_res = infill_report(cfg.model, params, tok, items, group_size=4, show=show)
    print("== 3. exact log-likelihood of held-out rows", flush=True)
    ll_res = likelihood_report(cfg.model, params, cfg.data)
    png = plot_run(cfg.run_dir)

    print(f"\n{'order':>14} {'exact chars':>12} {'ROUGE-L':>8}  (blank: first body line of {len(items)} "
          f"held-out functions)")
    for order, r in infill_res.items():
        print(f"{order:>14} {r['exact_chars']:>12.3f} {r['rougeL']:>8.3f}")
    print(f"\n{'grouping':>14} {'nats/token':>11} {'bits/byte':>10}")
    for strat, r in ll_res.items():
        print(f"{strat:>14} {r['nats_per_token']:>11.3f} {r['bits_per_byte']:>10.3f}")
    report = dict(train=metrics, infill=infill_res, log_likelihood=ll_res, loss_png=png,
                  final_checkpoint=final_dir, seconds=time.time() - t0)
    report_path = fs.join(cfg.run_dir, "demo_report.json")
    fs.write_text(report_path, json.dumps(report, indent=2, default=str))
    print(f"\nloss curves: {png}\nreport: {report_path}\n"
          f"try: a3jax infill --ckpt {final_dir} --text 'def add(a, b):\\n    [MASK:12]\\n'")
    return report


def cli_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="a3jax demo", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    ap.add_argument("--infill-count", type=int, default=16)
    ap.add_argument("--show", type=int, default=4, help="infill examples printed per order")
    args = ap.parse_args(argv)
    run(args.config, args.overrides, args.infill_count, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
