"""lm-eval with `--model a3jax` (content stream) against lm-eval's own `hf` model on the same LLaMA,
offline on local tasks (multiple-choice + generate_until): wall time of the whole evaluation and of
each request type, and the XLA compiles on the a3jax side (count and seconds per request type).

    python bench/lm_eval_adapter.py [--model tiny|smollm2] [--mc 12] [--gen 6] [--max-gen 16] \\
        [--batch-size 8] [--out bench/results/lm_eval_adapter[_smollm2].json]

--model tiny (default): a random LLaMA made locally with transformers (--hidden, --layers) with a
byte-level tokenizer; both sides read the same directory. --model smollm2: the project's real model
(SmolLM2-135M-Instruct's GGUF where `make install` put it), converted by `a3jax convert gguf-to-a3`;
a3jax loads that checkpoint (its own tokenizer) as `--model_args ckpt=...` would, and lm-eval's `hf`
model loads the same weights exported by `a3jax convert a3-to-hf` (model and tokenizer from that
local directory: nothing is downloaded). An untimed one-document run with the hf model goes first:
lm-eval builds the task datasets and imports its metrics on a process's first evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hf_models import write_byte_tokenizer  # noqa: E402 (the tests' tokenizer: both sides read it)

WORDS = "the cat sat on a mat while one two three dogs ran far away from home and back".split()


def make_model(d, hidden, layers):
    import torch
    import transformers

    vocab = write_byte_tokenizer(d, model_max_length=512)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)


def make_tasks(d, n_mc, n_gen, max_gen):
    from a3jax.eval.lm_eval_adapter import write_generate_task, write_mc_task

    mc, gen = os.path.join(d, "mc.jsonl"), os.path.join(d, "gen.jsonl")
    with open(mc, "w") as f:
        for i in range(n_mc):  # contexts and choices of varied lengths: many request shapes
            ctx = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 7))
            ch = [" " + " ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(1 + (i + j) % 3)) for j in range(4)]
            f.write(json.dumps({"context": ctx, "choices": ch, "label": i % 4}) + "\n")
    with open(gen, "w") as f:
        for i in range(n_gen):
            f.write(json.dumps({"prompt": " ".join(WORDS[i:i + 2 + 2 * i]), "target": " x"}) + "\n")
    tasks = os.path.join(d, "tasks")
    write_mc_task(mc, tasks, "bench_mc")
    write_generate_task(gen, tasks, "bench_gen", max_gen_toks=max_gen)
    return tasks


COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}


class Timed:
    """Wraps an lm-eval LM: seconds spent per request type, and the JAX compile events (XLA
    compiles, with tracing and lowering seconds) that happen inside each."""

    def __init__(self, lm, events):
        self.seconds, self.events, self.phase = {}, events, "outside"
        for name in ("loglikelihood", "generate_until"):
            fn = getattr(lm, name)

            def timed(requests, *a, _fn=fn, _name=name, **k):
                self.phase, t = _name, time.perf_counter()
                try:
                    return _fn(requests, *a, **k)
                finally:
                    self.seconds[_name] = self.seconds.get(_name, 0.0) + time.perf_counter() - t
                    self.phase = "outside"
            setattr(lm, name, timed)


def run(lm, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    events = []
    timed = Timed(lm, events)

    def on_event(name, secs, **_):
        if name in COMPILE_EVENTS:
            events.append((timed.phase, COMPILE_EVENTS[name], secs))
    import jax
    jax.monitoring.register_event_duration_secs_listener(on_event)
    t = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=["bench_mc", "bench_gen"],
                              task_manager=TaskManager(include_path=tasks), bootstrap_iters=0, log_samples=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    total = time.perf_counter() - t
    mc = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lls = [r[0] for s in mc for r in s["filtered_resps"]]
    gens = [s["filtered_resps"][0] for s in sorted(out["samples"]["bench_gen"], key=lambda s: s["doc_id"])]
    res = {"total_s": total, **{f"{k}_s": v for k, v in timed.seconds.items()},
           "acc": out["results"]["bench_mc"]["acc,none"]}
    if events:  # only a JAX model compiles
        res["compiles"] = sum(kind == "compile" for _, kind, _ in events)
        res["compile_s"] = sum(s for _, kind, s in events if kind == "compile")
        res["trace_lower_s"] = sum(s for _, kind, s in events if kind != "compile")
        res["by_phase"] = {ph: {"compiles": sum(k == "compile" for p, k, _ in events if p == ph),
                                "compile_s": sum(s for p, k, s in events if p == ph and k == "compile"),
                                "trace_lower_s": sum(s for p, k, s in events if p == ph and k != "compile")}
                           for ph in sorted({p for p, _, _ in events})}
    return res, lls, gens


def hf_lm(path, batch_size):
    """lm-eval's `hf` model on a local directory. Its one-token logits cache is off: it hands a request
    the logits of another whose context + continuation[:-1] has the same tokens, and on the smollm2
    tasks one such pair gets a log-likelihood 2.5 nats off transformers' own (the comparison would
    then measure that, not the models); the cache saves one forward row of 48 here."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=path, device="cpu", batch_size=batch_size, dtype="float32", logits_cache=False)


def tiny_models(d, a):
    """(make the a3jax LM, make the hf LM) over a random tiny LLaMA written to d."""
    from a3jax.convert import from_hf
    from a3jax.data.tokenizers import load_tokenizer
    from a3jax.eval.lm_eval_adapter import A3JaxLM

    make_model(d, a.hidden, a.layers)

    def ours():
        cfg, params = from_hf(d)
        return A3JaxLM(cfg=cfg, params=params, tokenizer_obj=load_tokenizer(d), batch_size=a.batch_size,
                       stream="content")
    return ours, lambda: hf_lm(d, a.batch_size)


def smollm2_models(d, a):
    """(make the a3jax LM, make the hf LM) over SmolLM2-135M: the GGUF converted to an a3jax checkpoint
    (loaded by path, as --model_args ckpt=... does), and that checkpoint exported for transformers."""
    from a3jax import fs
    from a3jax.convert.cli import cli_main
    from a3jax.eval.lm_eval_adapter import A3JaxLM
    from smollm2 import FILE

    gguf = os.path.join(fs.cache_dir(), "smollm2", FILE)
    if not os.path.isfile(gguf):
        sys.exit(f"{gguf} is missing: run `make install` (it fetches SmolLM2-135M into A3JAX_CACHE_DIR)")
    ckpt, hf = os.path.join(d, "ckpt"), os.path.join(d, "hf")
    for argv in (["gguf-to-a3", "--gguf", gguf, "--out", ckpt, "--no-progress"],
                 ["a3-to-hf", "--ckpt", ckpt, "--out", hf]):
        if cli_main(argv) != 0:
            sys.exit(f"a3jax convert {argv[0]} failed")
    return (lambda: A3JaxLM(ckpt=ckpt, batch_size=a.batch_size, stream="content"),
            lambda: hf_lm(hf, a.batch_size))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--mc", type=int, default=12)
    ap.add_argument("--gen", type=int, default=6)
    ap.add_argument("--max-gen", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128, help="tiny model width")
    ap.add_argument("--layers", type=int, default=4, help="tiny model depth")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/lm_eval_adapter[_smollm2].json)")
    a = ap.parse_args()
    out_path = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     "lm_eval_adapter" + ("" if a.model == "tiny" else f"_{a.model}") + ".json")

    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(d, "datasets")  # before `datasets` is imported
        ours, theirs = (tiny_models if a.model == "tiny" else smollm2_models)(d, a)
        tasks = make_tasks(d, a.mc, a.gen, a.max_gen)
        results = {}
        for name, make in (("warm-up", theirs), ("a3jax", ours), ("hf", theirs)):
            t = time.perf_counter()
            lm = make()
            load = time.perf_counter() - t
            if name == "warm-up":
                # untimed, one document per task: lm-eval builds the datasets and imports its metrics
                # on the first evaluation of a process, which neither timed run should pay
                from lm_eval import simple_evaluate
                from lm_eval.tasks import TaskManager
                simple_evaluate(model=lm, tasks=["bench_mc", "bench_gen"], limit=1, bootstrap_iters=0,
                                task_manager=TaskManager(include_path=tasks))
                continue
            res, lls, gens = run(lm, tasks)
            results[name] = dict(res, load_s=load, lls=lls, gens=gens)
            del lm
    (res_a, res_h) = results["a3jax"], results["hf"]
    lls_a, gens_a, lls_h, gens_h = res_a.pop("lls"), res_a.pop("gens"), res_h.pop("lls"), res_h.pop("gens")
    agree = {"max_ll_diff": float(np.max(np.abs(np.subtract(lls_a, lls_h)))),
             "generations_equal": sum(x == y for x, y in zip(gens_a, gens_h)), "generations": len(gens_a)}
    print(f"{a.model}: {'model':6} {'load s':>7} {'total s':>8} {'loglik s':>9} {'generate s':>10} {'compiles':>9} "
          f"{'compile s':>9} {'trace s':>8}")
    for name, r in (("a3jax", res_a), ("hf", res_h)):
        print(f"{'':{len(a.model) + 2}}{name:6} {r['load_s']:7.2f} {r['total_s']:8.2f} {r.get('loglikelihood_s', 0):9.2f} "
              f"{r.get('generate_until_s', 0):10.2f} {r.get('compiles', '-'):>9} {r.get('compile_s', 0):9.2f} "
              f"{r.get('trace_lower_s', 0):8.2f}")
    for ph, v in res_a.get("by_phase", {}).items():
        print(f"  a3jax compiles in {ph}: {v['compiles']} ({v['compile_s']:.2f} s compile, "
              f"{v['trace_lower_s']:.2f} s trace+lower)")
    print(f"ratio a3jax/hf {res_a['total_s'] / res_h['total_s']:.2f}x; agreement {agree}")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "out"}, "a3jax": res_a, "hf": res_h,
                   "agreement": agree, "ratio": res_a["total_s"] / res_h["total_s"]}, f, indent=2)


if __name__ == "__main__":
    main()
