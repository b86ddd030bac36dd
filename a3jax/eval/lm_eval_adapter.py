"""lm-evaluation-harness adapter: model name `a3jax` (loglikelihood, loglikelihood_rolling,
generate_until), offline on local JSONL task files.

    from a3jax.eval.lm_eval_adapter import A3JaxLM, write_mc_task, evaluate_local
    lm = A3JaxLM(ckpt="runs/x/params")                # or A3JaxLM(cfg=cfg, params=params)
    task_dir = write_mc_task("my_mc.jsonl", "/tmp/tasks", "my_mc")   # our multiple-choice JSONL
    results = evaluate_local(lm, ["my_mc"], include_path=task_dir)

Command line (registers the model, then runs lm-eval's own CLI):

    python -m a3jax.eval.lm_eval_adapter --model a3jax --model_args ckpt=CKPT,group_size=1 \\
        --include_path /tmp/tasks --tasks my_mc

Scoring semantics: a request's context is encoded left to right after BOS and its continuation is
scored exactly as AR groups of `group_size` (1 = plain AR chain rule). `loglikelihood_rolling` scores
the whole text left to right (or under `rolling_order`, any a3jax.data.grouping strategy).
`generate_until` decodes greedily (or with temperature from gen_kwargs) with the KV-cached decoder.
`stream=content` (model_args) evaluates the causal content stream instead: the converted base LLaMA
before adaptation, the AR baseline (left to right only: group_size 1, AR orders).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from a3jax import fs
from a3jax.checkpoint import load_params
from a3jax.decode.text import load_tok
from a3jax.eval.tasks import A3Evaluator


def _bool(x) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


@register_model("a3jax")
class A3JaxLM(LM):
    def __init__(self, ckpt: Optional[str] = None, tokenizer: str = "auto", batch_size=8, group_size=1,
                 context_order: str = "ar", rolling_order: str = "ar", gen_order: str = "left_to_right",
                 gen_group_size=1, max_gen_toks=64, stream: str = "query", cfg=None, params=None,
                 tokenizer_obj=None, max_batch_size=None, device=None, **unknown):
        # max_batch_size and device come from lm-eval's own --max_batch_size / --device (not used: the
        # batch is batch_size, the device JAX's); anything else is a typo that would run silently.
        if unknown:
            raise ValueError(f"A3JaxLM: unknown model_args {sorted(unknown)}; known: ckpt, tokenizer, group_size, "
                             f"context_order, rolling_order, gen_order, gen_group_size, max_gen_toks, stream")
        super().__init__()
        if cfg is None or params is None:
            if ckpt is None:
                raise ValueError("A3JaxLM needs ckpt=DIR (or cfg= and params=)")
            cfg, params = load_params(ckpt)
        if tokenizer_obj is None:
            tokenizer_obj = load_tok(tokenizer, ckpt or "")
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):  # lm-eval's "auto"
            bs = 8
        self.ev = A3Evaluator(cfg, params, tokenizer_obj, batch_size=bs, stream=stream)
        self.group_size = int(group_size)
        self.context_order = context_order
        self.rolling_order = rolling_order
        self.gen_order = gen_order
        self.gen_group_size = int(gen_group_size)
        self.max_gen_toks = int(max_gen_toks)

    # lm-eval calls these with lists of Instance; .args holds the request tuple
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [tuple(r.args[:2]) for r in requests]
        out = self.ev.loglikelihood(pairs, self.group_size, self.context_order)
        return [(ll, greedy) for ll, greedy in out]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.ev.rolling_loglikelihood([r.args[0] for r in requests], self.rolling_order)

    def generate_until(self, requests, disable_tqdm: bool = False):
        # Requests with the same settings go to the evaluator together: it decodes them in fixed
        # [batch_size, bucket] shapes, so a task's prompts cost a few compiles, not a decode call each.
        groups: dict = {}
        for i, r in enumerate(requests):
            context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kw.get("until") or ["\n"]
            if isinstance(until, str):
                until = [until]
            temp = float(kw.get("temperature", 0.0)) if _bool(kw.get("do_sample", False)) else 0.0
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((tuple(until), n, temp), []).append((i, context))
        outs = [""] * len(requests)
        for (until, n, temp), items in groups.items():
            texts = self.ev.generate([c for _, c in items], max_new_tokens=n, until=until, order=self.gen_order,
                                     group_size=self.gen_group_size, temperature=temp)
            for (i, _), text in zip(items, texts):
                outs[i] = text
        return outs

MC_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_mc_task(jsonl_path: str, out_dir: str, name: str) -> str:
    """An lm-eval task YAML over one of our multiple-choice JSONL files (docs/evaluate.md) in
    out_dir; returns out_dir, to pass as include_path. The continuation is the choice text as
    written (put a leading space in the choices if the context does not end with one)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
        # lm-eval reads the task file itself, from a local path: a gs:// one is copied to the cache first
        f.write(MC_TASK_YAML.format(name=name, path=fs.local_copy(jsonl_path)))
    return out_dir


GENERATE_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_generate_task(jsonl_path: str, out_dir: str, name: str, max_gen_toks: int = 64) -> str:
    """An lm-eval generate_until task YAML over a JSONL file of {prompt, target} rows in out_dir
    (greedy, until a newline, exact match against the target); returns out_dir, as write_mc_task."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
        f.write(GENERATE_TASK_YAML.format(name=name, path=fs.local_copy(jsonl_path), max_gen_toks=int(max_gen_toks)))
    return out_dir


def evaluate_local(lm: A3JaxLM, tasks, include_path: str, limit=None):
    """lm_eval.simple_evaluate on local task YAMLs (offline). Returns its results dict."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # deferred: lm-eval's evaluator imports `datasets`, which reads the offline variables at import time
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include_path),
                           limit=limit, bootstrap_iters=0, log_samples=False)


def main(argv=None) -> None:
    """`python -m a3jax.eval.lm_eval_adapter <lm-eval CLI args>`: lm-eval's CLI with `a3jax` registered."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate  # deferred: after the offline variables, as above

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
