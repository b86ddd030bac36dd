"""lm-eval with `--model a3jax` (content stream) against lm-eval's own `hf` model on the same LLaMA,
offline on local tasks (multiple-choice + generate_until): wall time of the whole evaluation and of
each request type, and the number of XLA compiles on the a3jax side.

    python bench/lm_eval_adapter.py [--mc 12] [--gen 6] [--hidden 128] [--layers 4] \\
        [--out bench/results/lm_eval_adapter.json]

The model is a random LLaMA made locally with transformers (never downloaded) with a byte-level
tokenizer; both sides read the same directory.
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


class Timed:
    """Wraps an lm-eval LM: seconds spent per request type."""

    def __init__(self, lm):
        self.seconds = {}
        for name in ("loglikelihood", "generate_until"):
            fn = getattr(lm, name)

            def timed(requests, *a, _fn=fn, _name=name, **k):
                t = time.perf_counter()
                out = _fn(requests, *a, **k)
                self.seconds[_name] = self.seconds.get(_name, 0.0) + time.perf_counter() - t
                return out
            setattr(lm, name, timed)


def run(lm, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    timed = Timed(lm)
    t = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["bench_mc", "bench_gen"], task_manager=TaskManager(include_path=tasks),
                          bootstrap_iters=0, log_samples=True)
    total = time.perf_counter() - t
    mc = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
    lls = [r[0] for s in mc for r in s["filtered_resps"]]
    gens = [s["filtered_resps"][0] for s in sorted(out["samples"]["bench_gen"], key=lambda s: s["doc_id"])]
    return {"total_s": total, **{f"{k}_s": v for k, v in timed.seconds.items()},
            "acc": out["results"]["bench_mc"]["acc,none"]}, lls, gens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mc", type=int, default=12)
    ap.add_argument("--gen", type=int, default=6)
    ap.add_argument("--max-gen", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lm_eval_adapter.json"))
    a = ap.parse_args()

    import jax
    import numpy as np
    from lm_eval.models.huggingface import HFLM

    from a3jax.convert import from_hf
    from a3jax.data.tokenizers import load_tokenizer
    from a3jax.eval.lm_eval_adapter import A3JaxLM

    compiles = []

    def on_event(name, secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    with tempfile.TemporaryDirectory() as d:
        make_model(d, a.hidden, a.layers)
        tasks = make_tasks(d, a.mc, a.gen, a.max_gen)
        cfg, params = from_hf(d)
        ours = A3JaxLM(cfg=cfg, params=params, tokenizer_obj=load_tokenizer(d), batch_size=a.batch_size,
                       stream="content")
        res_a, lls_a, gens_a = run(ours, tasks)
        res_a.update(compiles=len(compiles), compile_s=sum(compiles))
        res_h, lls_h, gens_h = run(HFLM(pretrained=d, device="cpu", batch_size=a.batch_size, dtype="float32"), tasks)
    agree = {"max_ll_diff": float(np.max(np.abs(np.subtract(lls_a, lls_h)))),
             "generations_equal": sum(x == y for x, y in zip(gens_a, gens_h)), "generations": len(gens_a)}
    print(f"{'model':8} {'total s':>8} {'loglik s':>9} {'generate s':>10} {'compiles':>9} {'compile s':>9}")
    for name, r in (("a3jax", res_a), ("hf", res_h)):
        print(f"{name:8} {r['total_s']:8.2f} {r.get('loglikelihood_s', 0):9.2f} {r.get('generate_until_s', 0):10.2f} "
              f"{r.get('compiles', ''):>9} {r.get('compile_s', 0):9.2f}")
    print(f"ratio a3jax/hf {res_a['total_s'] / res_h['total_s']:.2f}x; agreement {agree}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items() if k != "out"}, "a3jax": res_a, "hf": res_h, "agreement": agree,
                   "ratio": res_a["total_s"] / res_h["total_s"]}, f, indent=2)


if __name__ == "__main__":
    main()
