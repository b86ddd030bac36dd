"""MDLM sampling: iterative unmasking in S steps (docs/decode.md), what `infill` / `generate` run for
an mdlm model (model.objective = mdlm).

Every blank starts as MASK. Step s (0 .. S-1) runs the denoiser (a3jax.model.diffusion: the content
stream, bidirectional inside the row, MASK never predicted) over the WHOLE row, draws a token for every
still-masked blank, and commits k of them so that floor(N * (s + 1) / S) of the row's N blanks are
committed after step s (the linear schedule's expected reveal count, made deterministic; MDLM's
sampler reveals each masked token with probability 1/(steps left), this reveals that many exactly).
Which k: `random` (uniform, as MDLM's ancestral sampler), `confidence` / `entropy` / `margin` (the
most certain first, LLaDA's low-confidence remasking), or `left_to_right` (leftmost first).
Committed tokens stay (MDLM's SUBS carry-over: an unmasked token is never remasked).

There is no KV cache: a bidirectional denoiser changes every position's keys and values whenever a
token is unmasked, so each step is a full forward over all T positions; S steps cost S full passes
(A3's cached decoder runs only the new rows). This is the cost the comparison in bench/compare.py
measures. One compiled `lax.while_loop`, static shapes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.decode import orders as orders_lib
from a3jax.decode import sampling
from a3jax.model import diffusion
from a3jax.model import token_logprobs

MDLM_ORDERS = ("random", "confidence", "entropy", "margin", "left_to_right")


def reveal_counts(n_blank, steps: int, s):
    """Blanks committed after step s (0-based) of `steps`: floor(n * (s + 1) / steps), [B] int32."""
    return (n_blank * (s + 1)) // steps


def _scores(order: str, logits, key, t: int):
    """Higher = commit sooner, [B, T]."""
    if order == "random":
        return jax.random.uniform(key, logits.shape[:2])
    if order == "left_to_right":
        return -jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), logits.shape[:2])
    # MASK's -inf logit would make 0 * -inf = nan in the entropy; a huge finite value is the same limit
    return orders_lib.criterion_scores(order, jnp.maximum(logits, -1e30), key)


class MdlmState(NamedTuple):
    s: jax.Array  # steps run
    tokens: jax.Array  # [B, T] MASK at the blanks not committed yet
    masked: jax.Array  # [B, T]
    logp: jax.Array  # [B, T]
    step: jax.Array  # [B, T] the step that committed each blank (-1 = none)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_loop(cfg, order: str, params, tokens, blank, valid, steps, stop, temperature, top_k, top_p, seed):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = valid.astype(jnp.int32)
    n_blank = blank.sum(-1).astype(jnp.int32)
    base = jax.random.PRNGKey(seed)
    state = MdlmState(s=jnp.int32(0), tokens=jnp.where(blank, jnp.int32(cfg.mask_token_id), tokens), masked=blank,
                      logp=jnp.zeros((b, t), jnp.float32), step=jnp.full((b, t), -1, jnp.int32))

    def body(st):
        s = st.s
        k_sample, k_order = jax.random.split(jax.random.fold_in(base, s))
        logits = diffusion.denoiser_logits(cfg, params, st.tokens, positions, segments)
        drawn = sampling.sample(k_sample, logits, temperature, top_k, top_p)
        lp = token_logprobs(logits, drawn)
        scores = jnp.where(st.masked, _scores(order, logits, k_order, t), -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # 0 = best still-masked blank
        k = reveal_counts(n_blank, steps, s) - (n_blank - st.masked.sum(-1))
        commit = st.masked & (rank < k[:, None])
        return MdlmState(s=s + 1, tokens=jnp.where(commit, drawn, st.tokens), masked=st.masked & ~commit,
                         logp=jnp.where(commit, lp, st.logp), step=jnp.where(commit, s, st.step))

    out = jax.lax.while_loop(lambda st: st.s < stop, body, state)
    return out.tokens, out.logp, out.step


def sample(cfg, params, tokens, known, valid, steps: int, order: str = "confidence", temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop=None):
    """Fills the blanks (valid & ~known) of tokens [B, T] in `steps` denoiser calls. Returns numpy
    (tokens [B, T] int32, logprobs [B, T] of each filled token, step [B, T]: -1 where not filled).
    stop < steps runs only the schedule's first `stop` steps (benchmarks). Inputs are checked by the
    caller (a3jax.decode.api)."""
    blank = np.asarray(valid, bool) & ~np.asarray(known, bool)
    toks, lp, step = _sample_loop(cfg, order, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(blank),
                                  jnp.asarray(valid, bool), jnp.int32(steps),
                                  jnp.int32(steps if stop is None else stop), jnp.float32(temperature),
                                  jnp.int32(top_k), jnp.float32(top_p), jnp.uint32(int(seed) & 0xFFFFFFFF))
    return np.asarray(toks), np.asarray(lp), np.asarray(step)
