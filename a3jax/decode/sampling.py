"""Token sampling: greedy (temperature 0), temperature, top-k, top-p. Pure jax, jit-friendly.

temperature, top_k and top_p may be traced values: one compiled decoding loop serves greedy and every
sampling setting (a `lax.cond` runs only the branch a call needs).

Randomness (A3 decoding). Every row has its own base key (`base_keys`): PRNGKey(seed) for every row by
default, PRNGKey(seed[r]) with one seed per row, fold_in(PRNGKey(seed), i) for sample i of a prompt
(`num_samples`, `independent_rows`). At step s a row's key is fold_in(base, s), and the token of the
blank at position p is drawn with fold_in(that key, p) (`position_keys`): a row's draws depend only on
its own base key and a position's draw not on which query slot, window or phase holds it. So a row
decodes the same alone or inside a batch, and rows with different keys are independent samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


def base_keys(seeds, sample_index=None):
    """Per-row base keys [B, 2] (uint32) from seeds [B] (ints); sample_index [B] (optional) makes
    row r's key fold_in(PRNGKey(seeds[r]), sample_index[r]): sample i of a seed."""
    seeds = jnp.asarray(np.asarray(seeds, np.int64) & 0xFFFFFFFF, jnp.uint32)
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    if sample_index is not None:
        keys = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(sample_index, jnp.uint32))
    return keys


def step_keys(keys, s):
    """Row keys [B, 2] at step s: fold_in(base key, s)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)


def position_keys(keys, pos):
    """Keys [B, Q, 2] for positions pos [B, Q] (any value; -1 slots get a key nobody uses)."""
    return jax.vmap(lambda k, p: jax.vmap(lambda q: jax.random.fold_in(k, q))(p))(keys, pos.astype(jnp.uint32))


def sampling_logits(logits, temperature=0.0, top_k=0, top_p=1.0):
    """The logits tokens are drawn from [..., V] (float32): logits / temperature filtered by top-k /
    top-p when temperature > 0; the model's own logits when greedy (temperature 0: unchanged)."""
    t = jnp.asarray(temperature, jnp.float32)
    logits = logits.astype(jnp.float32)
    off = (jnp.asarray(top_k) <= 0) & (jnp.asarray(top_p) >= 1.0)  # no filter: skip its sort over V
    return jax.lax.cond(
        t > 0, lambda x: jax.lax.cond(off, lambda y: y, lambda y: filter_logits(y, top_k, top_p), x / t),
        lambda x: x, logits)


def draw_at(keys, logits, temperature=0.0):
    """Token ids [B, Q] from logits [B, Q, V] (sampling_logits) with one key per slot, keys [B, Q, 2];
    argmax when temperature is 0."""
    def draw(_):
        one = lambda k, row: jax.random.categorical(k, row)
        return jax.vmap(jax.vmap(one))(keys, logits).astype(jnp.int32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, draw,
                        lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32), None)


def probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling distribution [..., V] (float32) of logits: softmax of logits / temperature
    filtered by top-k / top-p (temperature <= 0 reads as 1: greedy callers take the argmax)."""
    t = jnp.asarray(temperature, jnp.float32)
    scaled = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    off = (jnp.asarray(top_k) <= 0) & (jnp.asarray(top_p) >= 1.0)  # no filter: skip its sort over V
    scaled = jax.lax.cond(off, lambda x: x, lambda x: filter_logits(x, top_k, top_p), scaled)
    return jax.nn.softmax(scaled, axis=-1)


def sample(key, logits, temperature=0.0, top_k=0, top_p=1.0):
    """Token ids [B, Q] from logits [B, Q, V] with one key for every row (the content-stream and
    mdlm decoders). temperature 0 takes the argmax; otherwise logits / temperature are filtered by
    top-k / top-p and sampled."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = filter_logits(logits.astype(jnp.float32) / t, top_k, top_p)
        one_row = lambda row: jax.random.categorical(key, row, axis=-1)
        return jax.vmap(one_row)(scaled).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, None)
