"""`a3jax score`: exact log-likelihood of texts under a grouping, through the Engine.

    a3jax score --ckpt CKPT --text "hello world" --grouping random:4

An ar model (a plain causal LM) scores left to right with its content stream; another grouping needs
an A3-adapted model. `--stream content` scores an A3 model's content stream (the base LLaMA before
adaptation, left to right), the baseline `a3jax eval --stream content` gives too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from a3jax import fs
from a3jax.checkpoint import load_params
from a3jax.decode.engine import Engine
from a3jax.decode.text import load_tok
from a3jax.score import ScoreError


def _read_texts(args) -> list[str]:
    texts = list(args.text or [])
    for path in args.file or []:
        if path.endswith(".jsonl"):  # local or gs://
            for n, rec in fs.read_jsonl(path, ScoreError):
                if not isinstance(rec, dict) or args.field not in rec:
                    raise ScoreError(f"{path}:{n}: no field {args.field!r}")
                texts.append(rec[args.field])
        else:
            texts.append(fs.read_text(path))
    return texts


def score_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax score", description="Exact log-likelihood of texts under a "
                                 "grouping (one forward pass each batch).")
    ap.add_argument("--ckpt", required=True, help="params checkpoint directory")
    ap.add_argument("--tokenizer", default="auto", help="auto (the checkpoint's, else byte) | byte | path")
    ap.add_argument("--text", action="append", help="text to score (repeatable)")
    ap.add_argument("--file", action="append", help=".txt (whole file = one text) or .jsonl (one text per line)")
    ap.add_argument("--field", default="text", help="jsonl field holding the text")
    ap.add_argument("--grouping", default="ar",
                    help="grouping strategy: ar | blocks:k | random:k | ... (a3jax.data.grouping)")
    ap.add_argument("--seed", type=int, default=0, help="seed of random groupings")
    ap.add_argument("--stream", default="query", choices=("query", "content"),
                    help="query: A3 (default); content: the causal content stream, i.e. the base LLaMA before "
                         "adaptation (the AR baseline; --grouping ar only)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        texts = _read_texts(args)
        if not texts:
            ap.error("give --text or --file")
        cfg, params = load_params(args.ckpt)
        eng = Engine(cfg, params, load_tok(args.tokenizer, args.ckpt), slots=args.batch_size)
        rows = eng.score(texts, args.grouping, args.seed, stream=args.stream)
    except (ScoreError, ValueError, FileNotFoundError) as e:
        print(f"a3jax score: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(grouping=args.grouping, stream=args.stream, results=[
            dict(index=i, tokens=r.tokens, log_likelihood=r.log_likelihood, nll_per_token=r.nll_per_token,
                 ppl=r.ppl, bits_per_byte=r.bits_per_byte) for i, r in enumerate(rows)]), indent=2))
    else:
        print(f"{'#':>3} {'tokens':>7} {'log-lik':>12} {'nll/tok':>8} {'ppl':>10} {'bits/byte':>9}")
        for i, r in enumerate(rows):
            print(f"{i:>3} {r.tokens:>7} {r.log_likelihood:>12.3f} {r.nll_per_token:>8.4f} "
                  f"{r.ppl:>10.3f} {r.bits_per_byte:>9.4f}")
        tot = sum(r.log_likelihood for r in rows)
        n = sum(r.tokens for r in rows)
        print(f"total: {n} tokens, log-lik {tot:.3f}, ppl {math.exp(min(-tot / max(n, 1), 700.0)):.3f} "
              f"(grouping {args.grouping}, stream {args.stream})")
    return 0
