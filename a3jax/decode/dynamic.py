"""The dynamic loop: each step scores every remaining blank from the model's predictions (confidence,
entropy, margin, random_dynamic) and commits the best `commit` of them, or with a threshold every
blank sure enough (at least one).

It runs in phases (static shapes each): a step of a phase of width w runs the query rows of the first
w remaining blanks of each row (orders.first_remaining), and the phase ends when every row's remaining
blanks fit in the next, narrower phase. Every blank still remaining is a query row until the window
(if any) excludes it, so the tokens do not depend on the widths. A window W (semi-autoregressive
decoding) makes only the first W remaining blanks candidates. mode='reference' re-runs the full
forward each step with every committed token in group 0 and the blanks in group 1.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from a3jax.config import ModelConfig
from a3jax.decode import cache as cache_lib
from a3jax.decode import orders as orders_lib
from a3jax.decode import sampling
from a3jax.decode import step as step_lib


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static (compile-time) shape of a dynamic decode."""
    commit: int  # blanks committed per step (0 = threshold mode)
    use_cache: bool
    reference: bool
    widths: tuple  # query rows of each phase, descending
    window: int = 0  # candidates are the first `window` remaining blanks (0 = all)


@functools.partial(jax.jit, static_argnums=(0, 1))
def run(cfg: ModelConfig, plan: Plan, params, tokens, known, valid, kgroups, known_pos, known_groups, keys,
        opts: step_lib.LoopOpts):
    """keys [B, 2]: each row's base key (sampling.base_keys). Returns the final LoopState."""
    b, t = tokens.shape
    blank = valid & ~known
    cached = plan.use_cache and not plan.reference
    pend_w = plan.commit if plan.commit > 0 else plan.widths[0]
    state = step_lib.init_state(cfg, params, cached, tokens, known, kgroups, known_pos, known_groups, pend_w)

    def make_body(width):
        def body(state):
            q_pos = orders_lib.first_remaining(step_lib.remaining(state, blank), width)
            q_ok = q_pos >= 0
            if plan.window:  # only the first `window` remaining blanks are candidates
                q_ok &= jnp.arange(width)[None] < plan.window
            logits, cache = step_lib.logits_at(cfg, params, state, q_pos, q_ok, valid, cached, plan.reference)
            dist, drawn, lp, k_order = step_lib.draw(logits, q_pos, state, keys, opts)
            probs = jax.nn.softmax(dist, axis=-1)
            u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k)))(sampling.position_keys(k_order, q_pos))
            scores = orders_lib.scores_by_index(opts.criterion, probs, u)
            if plan.commit > 0:
                idx, ok = orders_lib.select_top_k(scores, q_ok, plan.commit)
                c_pos = jnp.take_along_axis(q_pos, idx, axis=1)
                c_tok = jnp.take_along_axis(drawn, idx, axis=1)
                c_lp = jnp.take_along_axis(lp, idx, axis=1)
            else:
                ok = orders_lib.select_threshold(scores, probs.max(-1), q_ok, opts.threshold)
                c_pos, c_tok, c_lp = q_pos, drawn, lp
            return step_lib.commit(state, cache, ok, c_pos, c_tok, c_lp, blank, opts)
        return body

    for i, width in enumerate(plan.widths):
        nxt = plan.widths[i + 1] if i + 1 < len(plan.widths) else None
        if i > 0 and plan.commit == 0:
            # threshold commits: the pending rows are as wide as the phase, so the last step's commits
            # enter the cache before the narrower phase starts
            pend = state.pending
            cache = state.cache
            if cached:
                cache = jax.lax.cond(
                    (pend >= 0).any(),
                    lambda c: cache_lib.commit_rows(cfg, params, c, state.tokens, pend, t + state.s - 1),
                    lambda c: c, cache)
            state = state.replace(cache=cache, pending=jnp.full((b, width), -1, jnp.int32))

        def cond(state, nxt=nxt):
            go = step_lib.going(state, blank, opts)
            if nxt is not None:  # hand over once every row's remaining blanks fit the next phase
                go &= step_lib.remaining(state, blank).sum(axis=1).max() > nxt
            return go

        state = jax.lax.while_loop(cond, make_body(width), state)
    return state
