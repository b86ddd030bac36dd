"""Token sampling: greedy (temperature 0), temperature, top-k, top-p. Pure jax, jit-friendly.

temperature, top_k and top_p may be traced values: one compiled decoding loop serves greedy and every
sampling setting (a `lax.cond` runs only the branch a call needs).

Randomness is per step, and by default not per row: every row of a batch draws with the same key, so
a row gives the same tokens whether it is decoded alone or inside a batch (the decoder derives the
step key as `fold_in(PRNGKey(seed), step)`). With `independent=True` row r draws with
`fold_in(step key, r)` instead (`row_keys`): N copies of one prompt in a batch give N independent
samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits, top_k=0, top_p=1.0):
    """Logits with everything outside the top-k, then outside the top-p nucleus (of the top-k
    renormalised), set to -inf. top_k <= 0 and top_p >= 1 disable the filters. The most likely token
    always survives; tokens tied with the last kept value are kept too."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    rank = jnp.arange(v)
    top_k = jnp.asarray(top_k)
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep = keep & ((before < top_p) | (jnp.asarray(top_p) >= 1.0))
    last = jnp.maximum(keep.sum(-1, keepdims=True) - 1, 0)  # kept entries are a prefix of the sort
    cutoff = jnp.take_along_axis(sorted_logits, last, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def row_keys(key, batch: int, independent=False):
    """Per-row keys [B, 2]: `key` for every row, or fold_in(key, r) for row r when `independent`
    (may be traced)."""
    own = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(batch))
    return jnp.where(jnp.asarray(independent), own, jnp.broadcast_to(key, own.shape))


def probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling distribution [..., V] (float32) of logits: softmax of logits / temperature
    filtered by top-k / top-p (temperature <= 0 reads as 1: greedy callers take the argmax)."""
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    off = (jnp.asarray(top_k) <= 0) & (jnp.asarray(top_p) >= 1.0)  # no filter: skip its sort over V
    scaled = jax.lax.cond(off, lambda x: x, lambda x: filter_logits(x, top_k, top_p), scaled)
    return jax.nn.softmax(scaled, axis=-1)


def sample(key, logits, temperature=0.0, top_k=0, top_p=1.0, independent=False):
    """Token ids [B, Q] from logits [B, Q, V]. temperature 0 takes the argmax; otherwise
    logits / temperature are filtered by top-k / top-p and sampled. Every row uses the same key
    unless `independent` (see `row_keys`)."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = filter_logits(logits.astype(jnp.float32) / t, top_k, top_p)
        keys = row_keys(key, logits.shape[0], independent)
        one_row = lambda k, row: jax.random.categorical(k, row, axis=-1)
        return jax.vmap(one_row)(keys, scaled).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)


def token_logprobs(logits, ids):
    """log p(ids) under the model's own distribution (temperature 1, unfiltered): [B, Q]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
