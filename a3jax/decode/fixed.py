"""The fixed-order loop: every blank's step is decided before decoding (a3jax.decode.orders: left to
right, random, or a user grouping), so step s runs the query rows of schedule[:, s] and commits them
all. One jitted `lax.while_loop`; the schedule is padded to a bucketed step count so the orders of
one input share one compiled loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from a3jax.config import ModelConfig
from a3jax.decode import step as step_lib


@functools.partial(jax.jit, static_argnums=(0, 1))
def run(cfg: ModelConfig, use_cache: bool, params, tokens, known, valid, kgroups, known_pos, known_groups,
        queries, keys, opts: step_lib.LoopOpts):
    """queries [B, S, K]: the positions of each step (-1 = none); keys [B, 2]: each row's base key
    (sampling.base_keys). Returns the final LoopState."""
    blank = valid & ~known
    state = step_lib.init_state(cfg, params, use_cache, tokens, known, kgroups, known_pos, known_groups,
                                queries.shape[2])

    def body(state):
        q_pos = jax.lax.dynamic_index_in_dim(queries, state.s, axis=1, keepdims=False)  # [B, K]
        q_ok = (q_pos >= 0) & ~state.done[:, None]
        q_ok &= ~jnp.take_along_axis(state.filled, jnp.maximum(q_pos, 0), axis=1)
        logits, cache = step_lib.logits_at(cfg, params, state, q_pos, q_ok, valid, use_cache, False)
        _, drawn, lp, _ = step_lib.draw(logits, q_pos, state, keys, opts)
        return step_lib.commit(state, cache, q_ok, q_pos, drawn, lp, blank, opts)

    return jax.lax.while_loop(lambda st: step_lib.going(st, blank, opts), body, state)
