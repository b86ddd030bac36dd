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
import re
import sys
import time

import numpy as np

from a3jax import fs
from a3jax.checkpoint import load_params
from a3jax.data.rows import placeholder_id
from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode import DecodeError, generate, infill

MASK_RE = re.compile(r"\[MASK:(\d+)\]")
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


def load_tok(spec: str, ckpt: str):
    """--tokenizer auto: the checkpoint's tokenizer.json when it has one, else the byte tokenizer."""
    if spec == "auto":
        spec = ckpt if fs.isfile(fs.join(ckpt, "tokenizer.json")) else "byte"
    return load_tokenizer(spec)


def parse_masked(text: str, tok):
    """Text with [MASK:n] blanks -> (pieces, ids, known, spans): ids start with BOS (known); each
    blank is n placeholder tokens (a3jax.data.rows.placeholder_id); spans are the blanks' (start, end)
    token ranges."""
    placeholder = placeholder_id(tok)
    ids, known, spans = [tok.bos_id], [True], []
    pos = 0
    for m in MASK_RE.finditer(text):
        piece = tok.encode(text[pos:m.start()])
        ids += piece
        known += [True] * len(piece)
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"blank {m.group(0)!r} must have at least one token")
        spans.append((len(ids), len(ids) + n))
        ids += [placeholder] * n
        known += [False] * n
        pos = m.end()
    piece = tok.encode(text[pos:])
    ids += piece
    known += [True] * len(piece)
    if not spans:
        raise ValueError("no blanks in --text: mark each one as [MASK:n] (n = number of tokens to fill)")
    return np.asarray(ids), np.asarray(known), spans


def render(tok, ids, spans, color: bool) -> str:
    """Decoded text (BOS dropped) with the spans highlighted when color."""
    out, pos = [], 1
    for a, b in spans:
        out.append(tok.decode(ids[pos:a]))
        filled = tok.decode(ids[a:b])
        out.append(f"{HILITE}{filled}{RESET}" if color else filled)
        pos = b
    out.append(tok.decode(ids[pos:]))
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
                    help="encode the context as AR chunks of this size (default: one group)")
    ap.add_argument("--no-cache", action="store_true", help="recompute every step (baseline)")
    ap.add_argument("--mode", default="a3", choices=("a3", "reference", "official"),
                    help="a3 (default) | reference: the reference code's dynamic resampling (dynamic orders; "
                         "'official' is its deprecated alias)")
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


def _decode_options(args, group_size: int) -> dict:
    """The keyword options `_common` adds, as infill/generate take them (group_size: the default)."""
    if args.speculative and args.group_size not in (None, 1):
        raise DecodeError(f"--speculative {args.speculative} samples token by token (the draft block is K); "
                          f"--group-size {args.group_size} does not apply")
    return dict(order=args.order or "left_to_right", group_size=args.group_size or group_size,
                temperature=args.temperature, seed=args.seed, use_cache=not args.no_cache, top_k=args.top_k,
                top_p=args.top_p, threshold=args.threshold, prompt_group_size=args.prompt_group_size,
                mode=args.mode, speculative=args.speculative, independent_rows=args.independent_rows,
                window=args.window, return_info=True)


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
        tok = load_tok(args.tokenizer, args.ckpt)
        ids, known, spans = parse_masked(text, tok)
        cfg, params = load_params(args.ckpt)
        t0 = time.perf_counter()
        res = infill(cfg, params, ids[None], known[None], **_decode_options(args, group_size=4))
        dt = time.perf_counter() - t0
    except (DecodeError, ValueError, FileNotFoundError, OSError) as e:
        return _fail("infill", e)
    out = res.tokens[0]
    if args.json:
        print(json.dumps(dict(text=render(tok, out, spans, False),
                              blanks=[tok.decode(out[a:b]) for a, b in spans], steps=res.num_steps,
                              seconds=round(dt, 4))))
    else:
        sys.stdout.write(render(tok, out, spans, _use_color(args.color)))
        if not text.endswith("\n"):
            sys.stdout.write("\n")
        print(f"[{int((~known).sum())} tokens in {res.num_steps} steps, {dt:.2f}s]", file=sys.stderr)
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
    ap.add_argument("--stream", default="query", choices=("query", "content"),
                    help="query: A3 group decoding (default); content: the content stream left to right with a "
                         "KV cache, i.e. the converted base LLaMA before adaptation (BOS only if the tokenizer "
                         "adds one)")
    args = ap.parse_args(argv)
    try:
        tok = load_tok(args.tokenizer, args.ckpt)
        prompts = [p if args.no_escapes else unescape(p) for p in args.prompt]
        content = args.stream == "content"
        seqs = []
        for p in prompts:
            ids = list(tok.encode(p))
            bos = not content or getattr(tok, "add_bos", True) or not ids
            seqs.append(([tok.bos_id] if bos else []) + ids)
        if content:
            fixed = {"--order": args.order, "--group-size": args.group_size, "--threshold": args.threshold,
                     "--prompt-group-size": args.prompt_group_size}
            given = [k for k, v in fixed.items() if v is not None] + (["--mode"] if args.mode != "a3" else []) + (
                ["--speculative"] if args.speculative else []) + (["--independent-rows"] if args.independent_rows else []) + (
                ["--window"] if args.window is not None else []) + (["--num-samples"] if args.num_samples != 1 else [])
            if given:
                raise ValueError(f"--stream content decodes left to right one token per step; "
                                 f"{', '.join(given)} does not apply")
            opts = dict(temperature=args.temperature, seed=args.seed, use_cache=not args.no_cache,
                        top_k=args.top_k, top_p=args.top_p, return_info=True, stream="content")
        else:
            opts = dict(_decode_options(args, group_size=1), num_samples=args.num_samples)
        cfg, params = load_params(args.ckpt)
        t0 = time.perf_counter()
        new, res = generate(cfg, params, seqs, args.max_new_tokens, stop_at_eos=not args.no_eos,
                            eos_token_id=tok.eos_id, **opts)
        dt = time.perf_counter() - t0
    except (DecodeError, ValueError, FileNotFoundError, OSError) as e:
        return _fail("generate", e)
    color = _use_color(args.color) and not args.json
    results = []
    n = args.num_samples
    for i, row in enumerate(new):  # rows i*n .. i*n+n-1: the samples of prompt i
        p = prompts[i // n]
        keep = [int(x) for x in row if int(x) not in (tok.pad_id, tok.eos_id)]
        cont = tok.decode(keep)
        results.append(dict(prompt=p, completion=cont) if n == 1 else dict(prompt=p, sample=i % n, completion=cont))
        if not args.json:
            print(p + (f"{HILITE}{cont}{RESET}" if color else cont))
    if args.json:
        print(json.dumps(dict(results=results, steps=res.num_steps, seconds=round(dt, 4))))
    else:
        print(f"[{len(prompts)} x {args.max_new_tokens} tokens max in {res.num_steps} steps, {dt:.2f}s]",
              file=sys.stderr)
    return 0
