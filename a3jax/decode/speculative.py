"""Self-speculative A3 sampling: k tokens per model pass when the model agrees with itself, and
always exactly the token-by-token distribution of a fixed order (docs/decode.md, "Speculative").

The order pi_0, pi_1, ... of a row's blanks is fixed before decoding. Blank pi_j gets group id
g0 + j (g0 = T, later than every known group), and "the query row of pi_j with cutoff c" has group
id g0 + c, so it sees the known tokens and exactly the blanks pi_0 .. pi_{c-1}.

Every pass of the loop is one cached `run_rows` call with k content rows and 2k query rows (one
content row and k query rows when no row of the batch verifies); a row is in one of two modes:

  draft   content: the token committed last (pi_{i-1}, a corrected token), written to the cache;
          query: pi_i .. pi_{i+k-1} with cutoff i. Their conditionals q_j = p(x | pi_<i) are the
          drafts' proposals (q_0 is the exact conditional of pi_i); sample the k drafts in parallel.
  verify  content: the k drafts with their final group ids g0+i+j (they see the drafts before them);
          query: (a) pi_{i+j} with cutoff i+j: the exact conditionals p_j, and (b) the next block
          pi_{i+k} .. pi_{i+2k-1} with cutoff i+k: the next drafts, valid when all k are accepted.
          Accept draft j with probability min(1, p_j(x_j) / q_j(x_j)) (draft 0 always: q_0 = p_0);
          at the first rejection sample from max(0, p_j - q_j) renormalised and stop. All accepted:
          the next drafts are ready and the row stays in verify mode; otherwise the corrected token
          is committed, its slot and the later drafts' slots are released in the cache (their
          content rows saw a rejected token), and the row goes to draft mode, which rewrites the
          corrected token's slot.

Temperature, top-k and top-p shape p and q alike (`sampling.probs`); greedy accepts while the draft
is the target's argmax. Everything after host-side preparation is one jitted `lax.while_loop`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.decode import cache as cache_lib
from a3jax.decode import orders as orders_lib
from a3jax.decode import sampling
from a3jax.model import KVCache
from a3jax.model import token_logprobs


def token_order(sched: np.ndarray, pad_to: int) -> np.ndarray:
    """The token-by-token order [B, pad_to] (-1 = none) of a fixed schedule sched [B, S, K]
    (a3jax.decode.orders.schedule): steps in order, positions within a step ascending."""
    b = sched.shape[0]
    flat = sched.reshape(b, -1)
    keep = flat >= 0
    idx = np.argsort(~keep, axis=1, kind="stable")
    out = np.where(np.take_along_axis(keep, idx, axis=1), np.take_along_axis(flat, idx, axis=1), -1)
    n = out.shape[1]
    if n < pad_to:
        out = np.pad(out, ((0, 0), (0, pad_to - n)), constant_values=-1)
    return out[:, :pad_to].astype(np.int32)


def _take(a, idx):
    """a [B, N] at idx [B, M]; -1 where idx is out of [0, N)."""
    n = a.shape[1]
    ok = (idx >= 0) & (idx < n)
    return jnp.where(ok, jnp.take_along_axis(a, jnp.clip(idx, 0, n - 1), axis=1), -1)


def _pick(x, j):
    """x [B, K, ...] at index j [B] -> [B, ...]."""
    return jnp.take_along_axis(x, j.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


class SpecState(flax.struct.PyTreeNode):
    s: jax.Array  # passes run
    tokens: jax.Array  # [B, T]
    group: jax.Array  # [B, T] uncached path: group ids of everything committed
    logp: jax.Array  # [B, T]
    step: jax.Array  # [B, T] the pass that committed each blank (-1 = none)
    i: jax.Array  # [B] blanks committed so far (index into the order)
    verify: jax.Array  # [B] drafts for pi_i .. pi_{i+k-1} wait for verification
    draft: jax.Array  # [B, k]
    q: jax.Array  # [B, k, V] the drafts' proposal distributions
    done: jax.Array  # [B]
    accepted: jax.Array  # [B]
    cache: Optional[KVCache] = None


class SpecOpts(NamedTuple):
    """Traced options (changing them never recompiles)."""
    max_steps: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_at_eos: jax.Array
    eos_id: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def run(cfg: ModelConfig, k: int, use_cache: bool, params, tokens, known, valid, kgroups, known_pos,
        known_groups, order, keys, opts: SpecOpts) -> SpecState:
    """The speculative decode loop. order [B, N] (-1 = none): each row's blanks in token order.
    keys [B, 2]: each row's base key (sampling.base_keys). Returns the final state (tokens, logp,
    step: the pass that committed each blank, s: passes run, accepted: drafts accepted per row)."""
    b, t = tokens.shape
    g0 = t
    big = jnp.int32(2 ** 30)
    rows = jnp.arange(b)[:, None]
    ar = jnp.arange(k)
    n_blank = (order >= 0).sum(axis=1)
    temp, top_k, top_p = opts.temperature, opts.top_k, opts.top_p
    greedy = temp <= 0
    vocab = cfg.vocab_size

    state = SpecState(
        s=jnp.int32(0), tokens=tokens, group=jnp.where(known, kgroups, big),
        logp=jnp.zeros((b, t), jnp.float32), step=jnp.full((b, t), -1, jnp.int32),
        i=jnp.zeros((b,), jnp.int32), verify=jnp.zeros((b,), bool), draft=jnp.zeros((b, k), jnp.int32),
        q=jnp.zeros((b, k, vocab), jnp.float32), done=jnp.zeros((b,), bool), accepted=jnp.zeros((b,), jnp.int32),
        cache=cache_lib.prefill(cfg, params, tokens, known_pos, known_groups) if use_cache else None)

    def finished(state):
        return state.done | (state.i >= n_blank)

    def cond(state):
        return (state.s < opts.max_steps) & (~finished(state)).any()

    def body(state):
        s, i, ver = state.s, state.i, state.verify
        act = ~finished(state)
        # draft block pi_i .. pi_{i+k-1} (verify rows) and the block whose drafts this pass makes
        d_idx = i[:, None] + ar
        d_pos = _take(order, d_idx)
        d_ok = (ver & act)[:, None] & (d_pos >= 0)
        d_pos = jnp.where(d_ok, d_pos, -1)
        n0 = jnp.where(ver, i + k, i)  # cutoff of the next drafts
        n_idx = n0[:, None] + ar
        n_pos = jnp.where(act[:, None], _take(order, n_idx), -1)
        pend = jnp.where(act & ~ver & (i > 0), _take(order, (i - 1)[:, None])[:, 0], -1)
        c_pos = jnp.where(ver[:, None], d_pos, jnp.where(ar[None] == 0, pend[:, None], -1))
        c_grp = jnp.where(ver[:, None], g0 + d_idx, g0 + i[:, None] - 1)
        q_pos = jnp.concatenate([d_pos, n_pos], axis=1)
        q_grp = jnp.concatenate([g0 + d_idx, jnp.broadcast_to(g0 + n0[:, None], (b, k))], axis=1)
        d_slot = jnp.where(d_ok, d_pos, t)
        toks = state.tokens.at[rows, d_slot].set(state.draft, mode="drop")

        if use_cache:
            def step(c_cols, q_cols):
                return cache_lib.cached_step_logits(cfg, params, state.cache, toks, c_pos[:, c_cols],
                                                    c_grp[:, c_cols], q_pos[:, q_cols], q_pos[:, q_cols] >= 0,
                                                    q_grp[:, q_cols])

            def draft_only():  # no row verifies: one content row and the k draft rows, not 3k rows
                n_logits, cache = step(slice(0, 1), slice(k, 2 * k))
                return jnp.concatenate([jnp.zeros_like(n_logits), n_logits], axis=1), cache

            logits, cache = jax.lax.cond((ver & act).any(), lambda: step(slice(None), slice(None)), draft_only)
        else:
            groups = state.group.at[rows, d_slot].set(g0 + d_idx, mode="drop")
            groups = groups.at[rows, jnp.where(n_pos >= 0, n_pos, t)].set(
                jnp.broadcast_to(g0 + n0[:, None], (b, k)), mode="drop")
            logits = cache_lib.full_step_logits(cfg, params, toks, groups, valid.astype(jnp.int32), q_pos)
        v_logits, n_logits = logits[:, :k], logits[:, k:]

        k_u, k_res, k_draft = jnp.moveaxis(
            jax.vmap(lambda kk: jax.random.split(kk, 3))(sampling.step_keys(keys, s)), 1, 0)

        # ---- verify: accept a prefix of the drafts, then one corrected token
        p = sampling.probs(v_logits, temp, top_k, top_p)  # [B, k, V]
        x = state.draft
        p_x = jnp.take_along_axis(p, x[..., None], axis=-1)[..., 0]
        q_x = jnp.take_along_axis(state.q, x[..., None], axis=-1)[..., 0]
        u = jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(k_u)
        ok_sampled = u * q_x < p_x  # u < p/q without dividing
        ok_greedy = jnp.argmax(v_logits, axis=-1) == x
        acc = (jnp.where(greedy, ok_greedy, ok_sampled) | (ar[None] == 0)) & d_ok
        n_acc = jnp.cumprod(acc, axis=1).sum(axis=1).astype(jnp.int32)
        all_acc = n_acc == d_ok.sum(axis=1)
        j = jnp.minimum(n_acc, k - 1)
        p_j, q_j = _pick(p, j), _pick(state.q, j)
        resid = jnp.maximum(p_j - q_j, 0.0)
        mass = resid.sum(-1, keepdims=True)
        resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_j)  # empty: float noise only
        drawn = jax.vmap(lambda kk, lg: jax.random.categorical(kk, lg))(k_res, jnp.log(resid))
        fix = jnp.where(greedy, jnp.argmax(_pick(v_logits, j), axis=-1), drawn).astype(jnp.int32)
        corrected = (ar[None] == n_acc[:, None]) & ~all_acc[:, None] & d_ok
        commit = (d_ok & (ar[None] < n_acc[:, None])) | corrected
        c_tok = jnp.where(corrected, fix[:, None], x)
        c_lp = token_logprobs(v_logits, c_tok)
        slot = jnp.where(commit, d_pos, t)
        new_tokens = state.tokens.at[rows, slot].set(c_tok, mode="drop")
        new_step = state.step.at[rows, slot].set(s, mode="drop")
        if use_cache:  # drafts from the first rejected one on saw a rejected token: free their slots
            cache = cache_lib.release(cache, jnp.where(d_ok & ~(ar[None] < n_acc[:, None]), d_pos, -1))
        else:
            cache = state.cache

        # ---- the next drafts (draft rows; in verify rows only kept when every draft was accepted)
        q_new = sampling.probs(n_logits, temp, top_k, top_p)
        sampled = jax.vmap(lambda kk, lg: jax.random.categorical(kk, lg))(k_draft, jnp.log(q_new))
        have_next = (n_pos >= 0).any(axis=1)
        # a row ends at its first EOS once every blank before it is filled (orders.eos_finished)
        fin = orders_lib.eos_finished(new_tokens, known | (new_step >= 0), valid & ~known, opts.eos_id)
        return SpecState(
            s=s + 1, tokens=new_tokens, group=state.group.at[rows, slot].set(g0 + d_idx, mode="drop"),
            logp=state.logp.at[rows, slot].set(c_lp, mode="drop"), step=new_step,
            i=jnp.where(act & ver, i + n_acc + jnp.where(all_acc, 0, 1), i),
            verify=act & have_next & (~ver | all_acc),
            draft=jnp.where(greedy, jnp.argmax(n_logits, axis=-1), sampled).astype(jnp.int32),
            q=q_new, done=state.done | (opts.stop_at_eos & fin), accepted=state.accepted + n_acc, cache=cache)

    return jax.lax.while_loop(cond, body, state)
