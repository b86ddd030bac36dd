"""Left-to-right decoding of an ar model (model.objective = ar: the content stream as a plain causal
LLaMA), what `generate` runs for such a checkpoint. Each step re-runs the content stream over the
buffer (groups = positions) and samples the token after each row's last one: no KV cache, the simple
baseline (the A3 decoder's cache does not apply: it serves the query stream).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.decode import sampling
from a3jax.model import apply_model


@functools.partial(jax.jit, static_argnums=(0,))
def _loop(cfg, params, tokens, lens, valid, new, temperature, top_k, top_p, seed):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segments = valid.astype(jnp.int32)
    rows = jnp.arange(b)
    base = jax.random.PRNGKey(seed)

    def body(s, st):
        toks, logp, step = st
        logits = apply_model(cfg, params, toks, positions, positions, segments, "content")
        at = lens + s  # the position filled at step s, predicted from position at - 1
        row_logits = logits[rows, at - 1][:, None]
        drawn = sampling.sample(jax.random.fold_in(base, s), row_logits, temperature, top_k, top_p)[:, 0]
        lp = sampling.token_logprobs(row_logits, drawn[:, None])[:, 0]
        return toks.at[rows, at].set(drawn), logp.at[rows, at].set(lp), step.at[rows, at].set(s)

    init = (tokens, jnp.zeros((b, t), jnp.float32), jnp.full((b, t), -1, jnp.int32))
    return jax.lax.fori_loop(0, new, body, init)


def generate_rows(cfg, params, tokens, lens, valid, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
                  seed=0):
    """tokens [B, T] with each row's prompt in [0, lens[b]) and room for max_new_tokens after it.
    Returns numpy (tokens, logprobs, step) over the buffer, as a3jax.decode.DecodeResult's fields."""
    out = _loop(cfg, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lens, jnp.int32), jnp.asarray(valid, bool),
                jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                jnp.uint32(int(seed) & 0xFFFFFFFF))
    return tuple(np.asarray(x) for x in out)
