"""Exact log-likelihood of any grouping in one forward pass (docs/method.md).

    log P(x) = sum_k sum_{i in G_k} log p(x_i | x_{G_1..G_{k-1}})

Every conditional is the query-stream prediction at i (it sees exactly the earlier groups), so one
forward pass with the grouping's ids gives all of them; `log_likelihood` sums them over the target,
non-padding positions. `score_rows` is the batched scorer of (ids, groups, target) rows that
`score_texts`, the Engine (a3jax.decode.engine: `a3jax score`) and the evaluation tasks (a3jax.eval) share.

Per objective (model.objective, from the checkpoint; its entry's `scorer` in a3jax.objectives):
'query' (a3) scores any grouping exactly; 'content' (ar, a plain causal LM) scores left to right only,
from the content stream (logits at i-1 predict token i), and refuses other groupings; 'nelbo' (mdlm)
has no exact likelihood: `nelbo` estimates its NELBO (an upper bound on -log P) from Monte-Carlo
maskings, and score_rows reports -NELBO in place of log P.

`stream="content"` scores with the content stream instead: the plain causal LLaMA (the converted base
model before adaptation), log p(x_i | x_<i) read from the content logits at i - 1. It is left to right
only, so the rows' groups must be AR (strictly increasing).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from a3jax import objectives
from a3jax.config import ModelConfig
from a3jax.data import rows as rows_lib
from a3jax.model import InputError, apply_model, default_layout, diffusion, token_logprobs, validate_inputs

MDLM_SAMPLES = 32  # Monte-Carlo maskings per row when score_rows scores an mdlm model


class ScoreError(ValueError):
    """Bad scoring input."""


@functools.partial(jax.jit, static_argnums=(0,))
def _logp_and_greedy(cfg, params, tokens, positions, groups, segment_ids):
    """Per-position log p(tokens[i] | earlier groups) [B, T] and whether tokens[i] is the argmax.
    A model scored by its content stream (ar): the content stream (groups = positions) at i-1 predicts
    tokens[i]; a segment's first token has no prediction (log p 0, greedy True: it is context)."""
    if objectives.of(cfg).scorer == "content":
        return _content_logp_and_greedy(cfg, params, tokens, positions, segment_ids)
    logits = apply_model(cfg, params, tokens, positions, groups, segment_ids, "query")
    tok_lp = token_logprobs(logits, tokens)
    return tok_lp, jnp.argmax(logits, axis=-1) == tokens


def _check_scorable(cfg: ModelConfig, groups, segment_ids, target=None) -> None:
    """A NELBO-scored model has no exact likelihood here (use nelbo); a content-stream scorer (ar) goes
    left to right only: within a segment the group ids must increase with the position, one token per
    group, over the target span."""
    try:
        obj = objectives.require(cfg, "exact log-likelihood (a3jax.score)", exact_likelihood=True)
    except objectives.ObjectiveError as e:
        raise ScoreError(f"{e}; its likelihood is estimated by a3jax.score.nelbo") from None
    if obj.scorer != "content":
        return
    g, seg = np.asarray(groups), np.asarray(segment_ids)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    if target is not None:
        same &= np.asarray(target, bool)[:, 1:]
    if (same & (g[:, 1:] <= g[:, :-1])).any():
        raise ScoreError(f"these params were trained with train.objective={obj.name!r} (a causal LM): they "
                         f"score left to right only (order 'ar', one token per group); got another grouping")


def _rows_nelbo(cfg, params, tokens, positions, segment_ids, target, key, samples: int):
    """[samples, B] Monte-Carlo NELBO terms (a3jax.model.diffusion.nelbo_sample), one per masking."""
    def one(_, k):
        return None, diffusion.nelbo_sample(cfg, params, k, tokens, positions, segment_ids, target)[0]

    return jax.lax.scan(one, None, jax.random.split(key, samples))[1]


@functools.partial(jax.jit, static_argnums=(0, 7))
def _nelbo_jit(cfg, params, tokens, positions, segment_ids, target, key, samples):
    terms = _rows_nelbo(cfg, params, tokens, positions, segment_ids, target, key, samples)
    # greedy: with every target masked, is each target the denoiser's argmax?
    xt = jnp.where(target, jnp.int32(cfg.mask_token_id), tokens)
    logits = diffusion.denoiser_logits(cfg, params, xt, positions, segment_ids)
    greedy = jnp.where(target, jnp.argmax(logits, -1) == tokens, True).all(-1)
    return terms, greedy


def nelbo(cfg: ModelConfig, params, tokens, segment_ids=None, target_mask=None, samples: int = 32, seed: int = 0,
          positions=None):
    """MDLM likelihood: (per-row NELBO in nats summed over the row's target tokens [B], its standard
    error [B]), both np.float32, from `samples` independent maskings (t ~ U(0, 1) per row and sample,
    each target masked with probability t; a3jax.model.diffusion). The NELBO is an upper bound on
    -log P(targets | the rest). Non-target positions are context (never masked); target_mask defaults
    to every non-padding position. Needs a NELBO-scored model (mdlm; model.objective) and samples >= 2."""
    objectives.require(cfg, "a3jax.score.nelbo", scorer="nelbo")
    if int(samples) < 2:
        raise ScoreError(f"samples must be >= 2 (the standard error needs two), got {samples}")
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    try:
        validate_inputs(cfg, tokens, positions, None, segment_ids)
    except InputError as e:
        raise ScoreError(str(e)) from None
    tok, pos, _, seg = default_layout(tokens, positions, None, segment_ids)
    target = np.asarray(seg) != 0
    if target_mask is not None:
        tm = np.asarray(target_mask, bool)
        if tm.shape != target.shape:
            raise ScoreError(f"target_mask has shape {tm.shape} but tokens has shape {target.shape}")
        target &= tm
    terms, _ = _nelbo_jit(cfg, params, tok, pos, seg, jnp.asarray(target), jax.random.PRNGKey(int(seed)), int(samples))
    terms = np.asarray(terms, np.float64)
    se = terms.std(axis=0, ddof=1) / math.sqrt(terms.shape[0])
    return terms.mean(axis=0).astype(np.float32), se.astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _content_logp_and_greedy(cfg, params, tokens, positions, segment_ids):
    """As _logp_and_greedy, from the causal content stream (groups = positions): position i is
    predicted by the logits at i - 1; position 0 gets 0 (it is never a target)."""
    logits = apply_model(cfg, params, tokens, positions, positions, segment_ids, "content")[:, :-1]
    nxt = tokens[:, 1:]
    tok_lp = token_logprobs(logits, nxt)
    greedy = jnp.argmax(logits, axis=-1) == nxt
    pad = lambda x, v: jnp.concatenate([jnp.full((x.shape[0], 1), v, x.dtype), x], axis=1)  # noqa: E731
    return pad(tok_lp, 0.0), pad(greedy, True)


STREAMS = ("query", "content")


def check_ar_rows(rows) -> None:
    """The content stream scores left to right: every row's groups must be strictly increasing."""
    for i, (ids, groups, _) in enumerate(rows):
        g = np.asarray(groups)
        if len(g) > 1 and not (np.diff(g) > 0).all():
            raise ScoreError(f"row {i}: the content stream scores left to right, but its groups are not AR "
                             f"(one token per group, in order); use order 'ar' and group size 1")


def token_log_probs(cfg: ModelConfig, params, tokens, groups, segment_ids=None, positions=None):
    """Per-position log p(tokens[i] | earlier groups) [B, T] float32 (padding positions included;
    mask them yourself, or use log_likelihood)."""
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
    _check_scorable(cfg, grp, seg)
    return _logp_and_greedy(cfg, params, tok, pos, grp, seg)[0]


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


# ----------------------------------------------------------------------------- rows and texts


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens (powers of two, then multiples of 256): few distinct compiles."""
    b = minimum
    while b < n and b < 256:
        b *= 2
    return b if b >= n else -(-n // 256) * 256


def score_rows(cfg: ModelConfig, params, rows, batch_size: int = 8, pad_id: int = 0, samples: int = MDLM_SAMPLES,
               seed: int = 0, stream: str = "query", length: Optional[int] = None):
    """rows: [(ids, groups, target mask)] -> [(sum of log p over the target, every target token the
    greedy choice?)], one forward pass per batch. Rows are padded into [batch_size, bucket] batches
    (a3jax.data.rows.pad_rows), so a call compiles once per length bucket; `length` (>= the longest
    row) pads every batch to that one length instead: one compile per call. stream="content": the
    causal content stream (AR rows only); a model whose scorer is the content stream (ar) always
    scores so. A NELBO-scored model (mdlm) gets (-NELBO from `samples` maskings, greedy with every
    target masked) instead: the groups are ignored (the target is whatever the mask says)."""
    if stream not in STREAMS:
        raise ScoreError(f"stream must be one of {STREAMS}, got {stream!r}")
    obj = objectives.require(cfg, "score_rows")
    if obj.scorer == "content":
        stream = "content"
    if stream == "content":
        if not obj.exact_likelihood:
            raise ScoreError(f"a {obj.name} model's content stream is not a causal LM (it is scored by its "
                             f"NELBO): stream='content' does not apply; see a3jax.score.nelbo")
        check_ar_rows(rows)
    out = []
    limit = cfg.max_position_embeddings
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        longest = max(len(r[0]) for r in chunk)
        if longest > limit:
            raise ScoreError(f"a sequence of {longest} tokens exceeds max_position_embeddings={limit}")
        if length is not None and longest > length:
            raise ScoreError(f"a sequence of {longest} tokens exceeds length={length}")
        lay = rows_lib.pad_rows(chunk, length or min(bucket(longest), limit), batch_size, pad_id)
        try:
            validate_inputs(cfg, lay.tokens, lay.positions, lay.groups, lay.segment_ids)
        except InputError as e:
            raise ScoreError(str(e)) from None
        if not obj.exact_likelihood:
            target = (lay.loss_mask != 0) & (lay.segment_ids != 0)
            terms, greedy = _nelbo_jit(cfg, params, jnp.asarray(lay.tokens), jnp.asarray(lay.positions),
                                       jnp.asarray(lay.segment_ids), jnp.asarray(target),
                                       jax.random.fold_in(jax.random.PRNGKey(int(seed)), start), int(samples))
            nel, greedy = np.asarray(terms).mean(0), np.asarray(greedy)
            out += [(-float(nel[i]), bool(greedy[i])) for i in range(len(chunk))]
            continue
        # a content-stream scorer (ar): check_ar_rows above checked its rows
        if stream == "content":
            lp, greedy = _content_logp_and_greedy(cfg, params, jnp.asarray(lay.tokens), jnp.asarray(lay.positions),
                                                  jnp.asarray(lay.segment_ids))
        else:
            lp, greedy = _logp_and_greedy(cfg, params, jnp.asarray(lay.tokens), jnp.asarray(lay.positions),
                                          jnp.asarray(lay.groups), jnp.asarray(lay.segment_ids))
        lp, greedy = np.asarray(lp), np.asarray(greedy)
        for i in range(len(chunk)):
            m = lay.loss_mask[i] != 0
            out.append((float(lp[i][m].sum()), bool(greedy[i][m].all())))
    return out


def score_texts(cfg: ModelConfig, params, tokenizer, texts, strategy: str = "ar", seed: int = 0,
                batch_size: int = 8, stream: str = "query"):
    """Per text: dict(tokens, log_likelihood, nll_per_token, ppl, bits_per_byte). BOS is prepended and
    conditioned on (not scored); the grouping strategy orders the text's tokens after it (text i
    draws from example index i). Batches are always batch_size rows (one compile per length bucket,
    however many texts); stream as in score_rows."""
    rows = []
    for i, text in enumerate(texts):
        row = rows_lib.text_row(tokenizer.bos_id, tokenizer.encode(text), strategy, seed, i)
        if len(row[0]) > cfg.max_position_embeddings:
            raise ScoreError(f"text {i} has {len(row[0])} tokens with BOS, more than max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        rows.append(row)
    out = []
    scores = score_rows(cfg, params, rows, batch_size, max(cfg.pad_token_id, 0), stream=stream)
    for i, (text, (ids, _, _), (v, _)) in enumerate(zip(texts, rows, scores)):
        n = len(ids) - 1
        nbytes = max(len(text.encode("utf-8")), 1)
        out.append(dict(index=i, tokens=n, log_likelihood=v, nll_per_token=-v / max(n, 1),
                        ppl=math.exp(min(-v / max(n, 1), 700.0)), bits_per_byte=-v / math.log(2) / nbytes))
    return out
