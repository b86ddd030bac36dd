"""One step of A3 group decoding, shared by the fixed-order loop (a3jax.decode.fixed) and the dynamic
loop (a3jax.decode.dynamic): the loop state, the query rows' logits (cached or full forward), the
draw, and the commit of the chosen blanks.

Group ids: known tokens keep their prompt groups (< T); the tokens committed at step s get T + s,
later than every known group, so step s's query rows see the known tokens and steps 0 .. s-1.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from a3jax.decode import cache as cache_lib
from a3jax.decode import orders as orders_lib
from a3jax.decode import sampling
from a3jax.model import KVCache
from a3jax.model import token_logprobs

BIG = 2 ** 30  # group id of a position not committed yet: later than every step


class LoopOpts(flax.struct.PyTreeNode):
    """The traced options of a decode loop (changing them never recompiles)."""
    criterion: jax.Array  # dynamic orders: index into orders.DYNAMIC_ORDERS
    max_steps: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    threshold: jax.Array
    teacher_forcing: jax.Array
    stop_at_eos: jax.Array
    eos_id: jax.Array


class LoopState(flax.struct.PyTreeNode):
    s: jax.Array  # steps run
    tokens: jax.Array  # [B, T]
    filled: jax.Array  # [B, T] known or committed
    group: jax.Array  # [B, T] group ids (BIG = not committed yet)
    logp: jax.Array  # [B, T] log-prob of each committed token
    step: jax.Array  # [B, T] the step that committed each position (-1 = none)
    done: jax.Array  # [B] rows ended at an EOS
    pending: jax.Array  # [B, W] positions committed last step, not yet in the cache (-1 = none)
    cache: Optional[KVCache] = None


def init_state(cfg, params, cached: bool, tokens, known, kgroups, known_pos, known_groups, pending_width: int):
    b, t = tokens.shape
    return LoopState(
        s=jnp.int32(0), tokens=tokens, filled=known, group=jnp.where(known, kgroups, jnp.int32(BIG)),
        logp=jnp.zeros((b, t), jnp.float32), step=jnp.full((b, t), -1, jnp.int32),
        done=jnp.zeros((b,), bool), pending=jnp.full((b, pending_width), -1, jnp.int32),
        cache=cache_lib.prefill(cfg, params, tokens, known_pos, known_groups) if cached else None)


def remaining(state: LoopState, blank):
    """[B, T] blanks still to fill (rows ended at an EOS have none)."""
    return blank & ~state.filled & ~state.done[:, None]


def logits_at(cfg, params, state: LoopState, q_pos, q_ok, valid, cached: bool, reference: bool):
    """Query-row logits [B, Q, V] at q_pos [B, Q] (q_ok: rows that count), and the cache with last
    step's commits written (cached) or unchanged."""
    g0 = state.tokens.shape[1]
    s = state.s
    if cached:
        return cache_lib.cached_step_logits(cfg, params, state.cache, state.tokens, state.pending, g0 + s - 1,
                                            q_pos, q_ok, g0 + s)
    if reference:  # every committed token in one group 0, the blanks in group 1
        groups = jnp.where(state.filled, 0, 1)
    else:
        groups = jnp.where(state.filled, state.group, jnp.int32(BIG))
    return cache_lib.full_step_logits(cfg, params, state.tokens, groups, valid.astype(jnp.int32), q_pos), state.cache


def draw(logits, q_pos, state: LoopState, keys, opts: LoopOpts):
    """(dist: the logits tokens are drawn from, drawn tokens [B, Q], their log-probs [B, Q], the step's
    order key [B, 2]). Teacher forcing takes the tokens already in the buffer."""
    k_sample, k_order = jnp.moveaxis(jax.vmap(jax.random.split)(sampling.step_keys(keys, state.s)), 1, 0)
    dist = sampling.sampling_logits(logits, opts.temperature, opts.top_k, opts.top_p)
    forced = jnp.take_along_axis(state.tokens, jnp.maximum(q_pos, 0), axis=1)
    drawn = jax.lax.cond(opts.teacher_forcing, lambda: forced, lambda: sampling.draw_at(
        sampling.position_keys(k_sample, q_pos), dist, opts.temperature))
    return dist, drawn, token_logprobs(logits, drawn), k_order


def commit(state: LoopState, cache, ok, c_pos, c_tok, c_lp, blank, opts: LoopOpts) -> LoopState:
    """Writes the chosen tokens (ok [B, C] at c_pos) with group T + s; they become next step's pending rows."""
    b, t = state.tokens.shape
    rows = jnp.arange(b)[:, None]
    s = state.s
    c_pos = jnp.where(ok, c_pos, -1)
    slot = jnp.where(ok, c_pos, t)  # out of range -> dropped
    tokens = state.tokens.at[rows, slot].set(c_tok, mode="drop")
    filled = state.filled.at[rows, slot].set(True, mode="drop")
    fin = orders_lib.eos_finished(tokens, filled, blank, opts.eos_id)
    return state.replace(
        s=s + 1, tokens=tokens, filled=filled,
        group=state.group.at[rows, slot].set(t + s, mode="drop"),
        logp=state.logp.at[rows, slot].set(c_lp, mode="drop"),
        step=state.step.at[rows, slot].set(s, mode="drop"),
        done=state.done | (opts.stop_at_eos & fin), pending=c_pos, cache=cache)


def going(state: LoopState, blank, opts: LoopOpts):
    return (state.s < opts.max_steps) & remaining(state, blank).any()
