"""Exact log-likelihood of any grouping in one forward pass (A3-METHOD.md §1, §4), and `a3jax score`.

    log P(x) = sum_k sum_{i in G_k} log p(x_i | x_{G_1..G_{k-1}})

Every conditional is the query-stream prediction at i (it sees exactly the earlier groups), so one
forward pass with the grouping's ids gives all of them; `log_likelihood` sums them over the target,
non-padding positions.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig


class ScoreError(ValueError):
    """Bad scoring input."""


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logprobs(cfg, params, tokens, positions, groups, segment_ids):
    from a3jax.model.transformer import apply_model

    logits = apply_model(cfg, params, tokens, positions, groups, segment_ids, "query")
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def token_log_probs(cfg: ModelConfig, params, tokens, groups, segment_ids=None, positions=None):
    """Per-position log p(tokens[i] | earlier groups) [B, T] float32 (padding positions included;
    mask them yourself, or use log_likelihood)."""
    from a3jax.model import InputError, default_layout, validate_inputs

    tokens = np.asarray(tokens)
    groups = np.asarray(groups)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if groups.ndim == 1:
        groups = np.broadcast_to(groups[None], tokens.shape)
    try:
        validate_inputs(cfg, tokens, positions, groups, segment_ids)
    except InputError as e:
        raise ScoreError(str(e)) from None
    tok, pos, grp, seg = default_layout(tokens, positions, groups, segment_ids)
    return _token_logprobs(cfg, params, tok, pos, grp, seg)


def log_likelihood(cfg: ModelConfig, params, tokens, groups, segment_ids=None, target_mask=None,
                   positions=None):
    """Exact log P of the target tokens under the grouping: [B] float32 (np).

    tokens [B, T]; groups [B, T] (or [T]) int group ids (smaller = earlier; ties form one group);
    segment_ids [B, T] (0 = padding, default all 1); target_mask [B, T] bool (default: all
    non-padding positions). Positions default to arange(T)."""
    lp = token_log_probs(cfg, params, tokens, groups, segment_ids, positions)
    shape = lp.shape
    keep = np.ones(shape, bool)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        keep &= np.broadcast_to(seg.reshape((1,) * (2 - seg.ndim) + seg.shape), shape) != 0
    if target_mask is not None:
        tm = np.asarray(target_mask, bool)
        tm = tm.reshape((1,) * (2 - tm.ndim) + tm.shape)
        if tm.shape != shape:
            raise ScoreError(f"target_mask has shape {np.asarray(target_mask).shape} but tokens has shape {shape}")
        keep &= tm
    return np.asarray(jnp.sum(jnp.where(jnp.asarray(keep), lp, 0.0), axis=-1))


# ----------------------------------------------------------------------------- text helpers


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens (powers of two, then multiples of 256): few distinct compiles."""
    b = minimum
    while b < n and b < 256:
        b *= 2
    return b if b >= n else -(-n // 256) * 256


def groups_for(strategy: str, length: int, seed: int, index: int = 0, anchor_bos: bool = True) -> np.ndarray:
    """Group ids for one document under a grouping strategy of a3jax.data.grouping ('ar',
    'blocks:k', 'random:k', ...), deterministic in (seed, index)."""
    from a3jax.data.grouping import example_rng, group_document

    return group_document(strategy, length, example_rng(seed, index), anchor_bos=anchor_bos)


def score_texts(cfg: ModelConfig, params, tokenizer, texts, strategy: str = "ar", seed: int = 0,
                batch_size: int = 8):
    """Per text: dict(tokens, log_likelihood, nll_per_token, ppl, bits_per_byte). BOS is prepended and
    conditioned on (not scored); the grouping strategy orders the text's tokens after it."""
    out = []
    items = []
    for i, text in enumerate(texts):
        ids = [tokenizer.bos_id] + list(tokenizer.encode(text))
        if len(ids) > cfg.max_position_embeddings:
            raise ScoreError(f"text {i} has {len(ids)} tokens with BOS, more than max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        g = groups_for(strategy, len(ids), seed, i, anchor_bos=True)  # BOS alone first, then the text
        items.append((i, np.asarray(ids), g.astype(np.int32), text))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        t = min(bucket(max(len(x[1]) for x in chunk)), cfg.max_position_embeddings)
        b = len(chunk)
        tok = np.full((b, t), max(cfg.pad_token_id, 0), np.int32)
        grp = np.zeros((b, t), np.int32)
        seg = np.zeros((b, t), np.int32)
        tgt = np.zeros((b, t), bool)
        for r, (_, ids, g, _) in enumerate(chunk):
            n = len(ids)
            tok[r, :n], grp[r, :n], seg[r, :n] = ids, g, 1
            tgt[r, 1:n] = True
        ll = log_likelihood(cfg, params, tok, grp, seg, tgt)
        for r, (i, ids, _, text) in enumerate(chunk):
            n = len(ids) - 1
            nbytes = max(len(text.encode("utf-8")), 1)
            v = float(ll[r])
            out.append(dict(index=i, tokens=n, log_likelihood=v, nll_per_token=-v / max(n, 1),
                            ppl=math.exp(min(-v / max(n, 1), 700.0)), bits_per_byte=-v / math.log(2) / nbytes))
    return out


# ----------------------------------------------------------------------------- CLI


def load_model(ckpt: str):
    """(cfg, params) from a checkpoint directory (a3jax.checkpoint.load_params, imported lazily)."""
    from a3jax.checkpoint import load_params

    return load_params(ckpt)


def _read_texts(args) -> list[str]:
    texts = list(args.text or [])
    for path in args.file or []:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        obj = json.loads(line)
                        if args.field not in obj:
                            raise ScoreError(f"{path}:{n}: no field {args.field!r}")
                        texts.append(obj[args.field])
            else:
                texts.append(f.read())
    return texts


def cli_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="a3jax score", description="Exact log-likelihood of texts under a "
                                 "grouping (one forward pass each batch).")
    ap.add_argument("--ckpt", required=True, help="params checkpoint directory")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json / model dir")
    ap.add_argument("--text", action="append", help="text to score (repeatable)")
    ap.add_argument("--file", action="append", help=".txt (whole file = one text) or .jsonl (one text per line)")
    ap.add_argument("--field", default="text", help="jsonl field holding the text")
    ap.add_argument("--order", default="ar", help="grouping strategy: ar | blocks:k | random:k | ... (a3jax.data.grouping)")
    ap.add_argument("--seed", type=int, default=0, help="seed of random groupings")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        texts = _read_texts(args)
        if not texts:
            ap.error("give --text or --file")
        from a3jax.data.tokenizers import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        cfg, params = load_model(args.ckpt)
        rows = score_texts(cfg, params, tok, texts, args.order, args.seed, batch_size=args.batch_size)
    except (ScoreError, ValueError, FileNotFoundError) as e:
        print(f"a3jax score: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(order=args.order, results=rows), indent=2))
    else:
        print(f"{'#':>3} {'tokens':>7} {'log-lik':>12} {'nll/tok':>8} {'ppl':>10} {'bits/byte':>9}")
        for r in rows:
            print(f"{r['index']:>3} {r['tokens']:>7} {r['log_likelihood']:>12.3f} {r['nll_per_token']:>8.4f} "
                  f"{r['ppl']:>10.3f} {r['bits_per_byte']:>9.4f}")
        tot = sum(r["log_likelihood"] for r in rows)
        n = sum(r["tokens"] for r in rows)
        print(f"total: {n} tokens, log-lik {tot:.3f}, ppl {math.exp(min(-tot / max(n, 1), 700.0)):.3f} "
              f"(order {args.order})")
    return 0
