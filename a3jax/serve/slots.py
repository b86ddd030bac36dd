"""Slot-level left-to-right decoding: the device half of continuous batching.

A `Lane` owns `slots` rows of fixed length `length` (token buffer [S, T] and a slot-indexed KV cache,
a3jax.decode.cache) and two compiled programs, both with shapes fixed when the lane is built:

    admit(i, prompt)  prefill one prompt into row i (the row's old cache is replaced whole)
    step(...)         one decoding step of every row at once; rows that are not active run but
                      commit nothing

Between steps the host (a3jax.serve.scheduler) admits new requests into free rows and retires finished
ones, so a request joins and leaves the running batch without waiting for the others.

Two lane kinds, the two left-to-right decoders of a3jax.decode:
    query    A3 decoding left to right in groups of `width` (1 = token by token): step s commits
             positions next .. next+width-1 of each row with group id T + s, exactly the fixed-order
             loop of a3jax.decode.fixed (the same visibility, the same per-position sampling keys:
             a row's tokens equal Engine.generate's).
    content  the content stream as a causal LM (an `ar` model), one token per step: the last filled
             token runs as a content row against the cache and its logits give the next token, with
             the sampling keys of a3jax.decode.content.

Per-row metadata (next position, limit, step count, sampling settings, keys) lives on the host and
is passed to every step, so a row's settings never recompile anything.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.data import rows as rows_lib
from a3jax.decode import cache as cache_lib
from a3jax.decode import sampling
from a3jax.model import KVCache, Rows, choose_kernel, lm_logits, run_rows, token_logprobs

KINDS = ("query", "content")


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def _admit(cfg: ModelConfig, params, tokens, cache: KVCache, i, row, known_pos, known_groups):
    one = cache_lib.prefill(cfg, params, row[None], known_pos[None], known_groups[None])
    put = lambda big, small, axis: jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), i, axis)
    cache = KVCache(put(cache.k, one.k, 1), put(cache.v, one.v, 1), put(cache.groups, one.groups, 0),
                    put(cache.segments, one.segments, 0))
    return jax.lax.dynamic_update_slice_in_dim(tokens, row[None], i, 0), cache


def _draw_query(logits, q_pos, s, keys, temperature, top_k, top_p):
    """The fixed-order loop's draw (a3jax.decode.step.draw) with a step count and settings per row."""
    k_sample = jax.vmap(jax.random.split)(jax.vmap(jax.random.fold_in)(keys, s))[:, 0]
    dist = jax.vmap(sampling.sampling_logits)(logits, temperature, top_k, top_p)
    pkeys = sampling.position_keys(k_sample, q_pos)
    return jax.vmap(lambda k, d, t: sampling.draw_at(k[None], d[None], t)[0])(pkeys, dist, temperature)


def _draw_content(logits, s, keys, temperature, top_k, top_p):
    """The content decoder's draw (a3jax.decode.content): fold_in(base key, step), one row each."""
    step_keys = jax.vmap(jax.random.fold_in)(keys, s)
    one = lambda k, lg, t, tk, tp: sampling.sample(k, lg[None], t, tk, tp)[0]
    return jax.vmap(one)(step_keys, logits, temperature, top_k, top_p)


def _commit(tokens, ok, q_pos, drawn):
    b, t = tokens.shape
    slot = jnp.where(ok, q_pos, t)  # out of range -> dropped
    return tokens.at[jnp.arange(b)[:, None], slot].set(drawn, mode="drop")


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _step_query(cfg: ModelConfig, width: int, params, tokens, cache, pending, nxt, limit, s, keys, temperature,
                top_k, top_p, active):
    t = tokens.shape[1]
    q_pos = nxt[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
    ok = active[:, None] & (q_pos < limit[:, None])
    logits, cache = cache_lib.cached_step_logits(cfg, params, cache, tokens, pending, (t + s - 1)[:, None],
                                                 q_pos, ok, (t + s)[:, None])
    drawn = _draw_query(logits, q_pos, s, keys, temperature, top_k, top_p)
    lp = token_logprobs(logits, drawn)
    return _commit(tokens, ok, q_pos, drawn), cache, drawn, lp, ok


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def _step_content(cfg: ModelConfig, params, tokens, cache, nxt, limit, s, keys, temperature, top_k, top_p, active):
    t = tokens.shape[1]
    last = jnp.clip(nxt - 1, 0, t - 1)[:, None]  # the token whose logits give this step's token
    seg = active[:, None].astype(jnp.int32)
    kind = choose_kernel(cfg, t + 1, step_rows=1)
    tok = jnp.take_along_axis(tokens, last, axis=1)
    hc, _, kv = run_rows(dataclasses.replace(cfg, attention=kind), params, tok, Rows(last, last, seg), None,
                         cache=cache, return_kv=True)
    cache = cache_lib.write(cache, kv, jnp.where(active[:, None], last, -1), last)
    logits = lm_logits(cfg, params, hc)  # [S, 1, V]
    drawn = _draw_content(logits, s, keys, temperature, top_k, top_p)
    lp = token_logprobs(logits, drawn)
    q_pos = nxt[:, None]
    ok = active[:, None] & (q_pos < limit[:, None])
    return _commit(tokens, ok, q_pos, drawn), cache, drawn, lp, ok


@jax.jit
def _base_key(seed, index, use_index):
    """sampling.base_keys for one row: PRNGKey(seed), folded with the sample index when use_index."""
    key = jax.random.PRNGKey(seed)
    return jnp.where(use_index, jax.random.fold_in(key, index), key)


def base_key(seed: int, sample_index=None) -> np.ndarray:
    """A row's base key [2] uint32, as a3jax.decode draws it for seed (and sample `sample_index`)."""
    return np.asarray(_base_key(np.uint32(int(seed) & 0xFFFFFFFF), np.uint32(sample_index or 0),
                                np.bool_(sample_index is not None)))


@dataclasses.dataclass
class StepOut:
    """What one step committed: for each row, the drawn tokens [S, W], their log-probs and which
    of them count (ok [S, W]: the row is active and the position is inside its limit)."""
    tokens: np.ndarray
    logprobs: np.ndarray
    ok: np.ndarray


class Lane:
    """`slots` rows of `length` positions decoding with one kind ('query' | 'content') and width."""

    def __init__(self, cfg: ModelConfig, params, kind: str, width: int, slots: int, length: int):
        if kind not in KINDS:
            raise ValueError(f"lane kind must be one of {KINDS}, got {kind!r}")
        if kind == "content" and width != 1:
            raise ValueError(f"the content stream decodes one token per step; width={width} does not apply")
        self.cfg, self.params, self.kind, self.width = cfg, params, kind, width
        self.slots, self.length = slots, length
        pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else 0
        self.tokens = jnp.full((slots, length), pad, jnp.int32)
        empty = cache_lib.empty_cache(cfg, slots, length)
        # its groups and segments start as one zeros buffer; the steps donate them separately
        self.cache = empty._replace(segments=jnp.zeros_like(empty.segments))
        s = slots
        self.active = np.zeros(s, bool)
        self.pending = np.full((s, width), -1, np.int32)
        self.next = np.zeros(s, np.int32)
        self.limit = np.zeros(s, np.int32)
        self.steps = np.zeros(s, np.int32)
        self.keys = np.zeros((s, 2), np.uint32)
        self.temperature = np.zeros(s, np.float32)
        self.top_k = np.zeros(s, np.int32)
        self.top_p = np.ones(s, np.float32)

    def free(self) -> list:
        return [int(i) for i in np.flatnonzero(~self.active)]

    def admit(self, i: int, prompt, max_new: int, key, temperature: float, top_k: int, top_p: float,
              prompt_group_size: int = 0) -> None:
        """Prefills `prompt` (ids, BOS included as the decoder expects) into row i and activates it."""
        n = len(prompt)
        if n < 1 or n + max_new > self.length:
            raise ValueError(f"prompt of {n} tokens + {max_new} new exceeds the lane length {self.length}")
        row = np.full(self.length, self.cfg.pad_token_id if self.cfg.pad_token_id >= 0 else 0, np.int32)
        row[:n] = prompt
        known_pos = np.full(self.length, -1, np.int32)
        known_groups = np.zeros(self.length, np.int32)
        if self.kind == "query":
            known_pos[:n] = np.arange(n)
            known_groups[:n] = rows_lib.prompt_groups(np.ones(n, bool), prompt_group_size or None)
        else:  # the last prompt token runs in the first step (its logits give the first new token)
            known_pos[:n - 1] = np.arange(n - 1)
            known_groups[:n - 1] = np.arange(n - 1)
        self.tokens, self.cache = _admit(self.cfg, self.params, self.tokens, self.cache, np.int32(i), row,
                                         known_pos, known_groups)
        self.active[i] = True
        self.pending[i] = -1
        self.next[i], self.limit[i], self.steps[i] = n, n + max_new, 0
        self.keys[i] = key
        self.temperature[i], self.top_k[i], self.top_p[i] = temperature, top_k, top_p

    def release(self, i: int) -> None:
        self.active[i] = False
        self.pending[i] = -1

    def step(self) -> StepOut:
        """One step of every row; advances the active rows' metadata."""
        common = (self.next, self.limit, self.steps, self.keys, self.temperature, self.top_k, self.top_p,
                  self.active)
        if self.kind == "query":
            self.tokens, self.cache, drawn, lp, ok = _step_query(self.cfg, self.width, self.params, self.tokens,
                                                                 self.cache, self.pending, *common)
        else:
            self.tokens, self.cache, drawn, lp, ok = _step_content(self.cfg, self.params, self.tokens, self.cache,
                                                                   *common)
        drawn, lp, ok = np.asarray(drawn), np.asarray(lp), np.asarray(ok)
        q_pos = self.next[:, None] + np.arange(self.width, dtype=np.int32)[None]
        self.pending = np.where(ok, q_pos, -1).astype(np.int32)
        self.next = self.next + self.width * self.active
        self.steps = self.steps + self.active
        return StepOut(drawn, lp, ok)
