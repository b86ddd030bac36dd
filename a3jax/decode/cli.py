"""`a3jax generate` and `a3jax infill`.

    a3jax generate --ckpt CKPT --prompt "def main():" --max-new-tokens 64 --order left_to_right --group-size 1
    a3jax generate --ckpt CKPT --prompt "The capital of France is" --stream content   # the base LLaMA
    a3jax infill   --ckpt CKPT --text "def add(a, b):\\n    [MASK:12]\\n" --order confidence --group-size 2

Blanks are written `[MASK:n]` (n tokens each). Backslash escapes \\n, \\t and \\\\ in --text/--prompt
are decoded (so a shell string can hold newlines; --no-escapes turns this off). The filled text goes
to stdout with the generated parts highlighted (ANSI bold green) when stdout is a terminal
(--color always|never|auto).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from a3jax import fs, objectives
from a3jax.checkpoint import load_params
from a3jax.decode.engine import Engine
from a3jax.decode.spec import DecodeError, DecodeSpec, SamplingParams
from a3jax.decode.text import load_tok, parse_masked, render

HILITE, RESET = "\033[1;32m", "\033[0m"


def unescape(text: str) -> str:
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "\\": "\\"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _use_color(flag: str) -> bool:
    if flag == "always":
        return True
    if flag == "never":
        return False
    return sys.stdout.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"


def _common(ap):
    ap.add_argument("--ckpt", required=True, help="params checkpoint directory (a3jax convert / train)")
    ap.add_argument("--tokenizer", default="auto", help="auto (the checkpoint's, else byte) | byte | path")
    ap.add_argument("--order", default=None,
                    help="left_to_right | random | confidence | entropy | margin | random_dynamic")
    ap.add_argument("--group-size", type=int, default=None, help="tokens committed per step")
    ap.add_argument("--threshold", type=float, default=None,
                    help="dynamic orders: commit every blank with max prob >= this (at least one)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-group-size", type=int, default=None,
                    help="the context's layout: 0 = one group, n = left-to-right chunks of n (default: the "
                         "layout the model was trained on, model.prompt_group_size)")
    ap.add_argument("--no-cache", action="store_true", help="recompute every step (baseline)")
    ap.add_argument("--mode", default="a3", choices=("a3", "reference"),
                    help="a3 (default) | reference: the reference code's dynamic resampling (dynamic orders)")
    ap.add_argument("--window", type=int, default=None, metavar="W",
                    help="dynamic orders: choose only among the first W remaining blanks (semi-autoregressive)")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="self-speculative sampling with draft blocks of K (fixed orders): exactly the "
                         "token-by-token distribution; --group-size is then not used")
    ap.add_argument("--independent-rows", action="store_true",
                    help="each row samples with its own key (repeated prompts give different samples)")
    ap.add_argument("--no-escapes", action="store_true", help="do not decode \\n \\t \\\\ in the text")
    ap.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of text")


# the flags that only the query stream (A3 decoding) takes, as `--flag`: value-or-None
def _query_only(args) -> dict:
    return {"--order": args.order, "--group-size": args.group_size, "--threshold": args.threshold,
            "--prompt-group-size": args.prompt_group_size, "--mode": args.mode if args.mode != "a3" else None,
            "--speculative": args.speculative or None, "--independent-rows": args.independent_rows or None,
            "--window": args.window, "--num-samples": getattr(args, "num_samples", 1) if getattr(
                args, "num_samples", 1) != 1 else None}


def _spec(args, **extra) -> DecodeSpec:
    """The DecodeSpec and SamplingParams of the flags `_common` adds (a DecodeError names a bad one)."""
    if args.speculative and args.group_size not in (None, 1):
        raise DecodeError(f"--speculative {args.speculative} samples token by token (the draft block is K); "
                          f"--group-size {args.group_size} does not apply")
    return DecodeSpec(order=args.order or "left_to_right", group_size=args.group_size, threshold=args.threshold,
                      prompt_group_size=args.prompt_group_size, mode=args.mode, speculative=args.speculative,
                      window=args.window, use_cache=not args.no_cache, **extra)


def _sampling(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          num_samples=getattr(args, "num_samples", 1), independent_rows=args.independent_rows)


def _engine(args, rows: int) -> Engine:
    cfg, params = load_params(args.ckpt)
    return Engine(cfg, params, load_tok(args.tokenizer, args.ckpt), slots=rows)


def _fail(prog, e) -> int:
    print(f"a3jax {prog}: error: {e}", file=sys.stderr)
    return 2


def infill_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax infill", description="Fill [MASK:n] blanks in a text with "
                                 "KV-cached any-order decoding.")
    _common(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help='text with blanks, e.g. "def add(a, b):\\n    [MASK:12]\\n"')
    src.add_argument("--file", help="read the text from this file")
    args = ap.parse_args(argv)
    try:
        if args.file:
            text = fs.read_text(args.file)
        else:
            text = args.text if args.no_escapes else unescape(args.text)
        spec, sampling = _spec(args), _sampling(args)
        eng = _engine(args, rows=1)
        t0 = time.perf_counter()
        res, = eng.infill(text, spec=spec, sampling=sampling)
        dt = time.perf_counter() - t0
    except (DecodeError, ValueError, FileNotFoundError, OSError) as e:
        return _fail("infill", e)
    n_blank = sum(b - a for a, b in parse_masked(text, eng.tokenizer)[2])
    if args.json:
        print(json.dumps(dict(text=res.text, blanks=res.blanks, steps=res.steps, seconds=round(dt, 4))))
    else:
        spans = parse_masked(text, eng.tokenizer)[2]
        color = (HILITE, RESET) if _use_color(args.color) else None
        sys.stdout.write(render(eng.tokenizer, res.tokens, spans, color))
        if not text.endswith("\n"):
            sys.stdout.write("\n")
        print(f"[{n_blank} tokens in {res.steps} steps, {dt:.2f}s]", file=sys.stderr)
    return 0


def generate_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax generate", description="Continue a prompt with KV-cached "
                                 "group decoding.")
    _common(ap)
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-eos", action="store_true", help="do not stop at EOS")
    ap.add_argument("--num-samples", type=int, default=1, metavar="N",
                    help="N independent samples of every prompt, decoded in one batch (use with --temperature > 0)")
    ap.add_argument("--stream", default=None, choices=("query", "content"),
                    help="query: A3 group decoding; content: the content stream left to right with a KV cache, "
                         "i.e. a plain causal LM (BOS only if the tokenizer adds one). Default: the model's own "
                         "(content for an ar model, query otherwise)")
    args = ap.parse_args(argv)
    try:
        prompts = [p if args.no_escapes else unescape(p) for p in args.prompt]
        eng = _engine(args, rows=len(prompts) * max(args.num_samples, 1))
        if args.stream == "content" or (args.stream is None and objectives.of(eng.cfg).decoder == "content"):
            given = [k for k, v in _query_only(args).items() if v is not None]
            if given:
                raise DecodeError(f"the content stream decodes left to right one token per step; {', '.join(given)} "
                                  f"does not apply")
        spec = _spec(args, stream=args.stream, stop_at_eos=not args.no_eos, eos_id=eng.tokenizer.eos_id)
        t0 = time.perf_counter()
        out = eng.generate(prompts, args.max_new_tokens, spec, _sampling(args))
        dt = time.perf_counter() - t0
    except (DecodeError, ValueError, FileNotFoundError, OSError) as e:
        return _fail("generate", e)
    color = _use_color(args.color) and not args.json
    results = []
    n = args.num_samples
    for c in out:  # prompt i's samples are i*n .. i*n+n-1
        results.append(dict(prompt=c.prompt, completion=c.text) if n == 1 else
                       dict(prompt=c.prompt, sample=c.sample, completion=c.text))
        if not args.json:
            print(c.prompt + (f"{HILITE}{c.text}{RESET}" if color else c.text))
    steps = out[0].steps if out else 0
    if args.json:
        print(json.dumps(dict(results=results, steps=steps, seconds=round(dt, 4))))
    else:
        print(f"[{len(prompts)} x {args.max_new_tokens} tokens max in {steps} steps, {dt:.2f}s]", file=sys.stderr)
    return 0
