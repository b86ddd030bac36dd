"""Slot-indexed exact KV cache for any-order decoding.

The cache holds the content keys/values of every committed token at the token's own slot (its
position in the row): k/v [L, B, T, Hkv, D], plus group ids and segment ids [B, T] in a
`a3jax.model.KVCache`. An uncommitted slot has segment 0 and is invisible under the visibility rule
(a3jax.masks), so no separate validity mask is needed.

Exactness (docs/method.md): the content state of a committed group depends only on that group and
earlier ones, so its keys/values never change once computed. Each decoding step therefore
  1. runs the tokens committed at the previous step as content rows (a new, later group id) against
     the cache, producing their keys/values, and in the same pass
  2. runs the query rows of the positions asked about now (group id one later still) against the
     cache plus those new content rows,
then writes the new keys/values into their slots. `cached_step_logits` is that one step.

Under an active mesh (`a3jax.sharding.activate`) every cache built here is laid out as
`a3jax.sharding.CACHE_AXES` defines; on one device that is a no-op.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from a3jax.config import ModelConfig
from a3jax.model import KVCache, Rows, apply_model, choose_kernel, dtype_of, lm_logits, run_rows
from a3jax.sharding import CACHE_AXES, constrain


def _laid_out(cache: KVCache) -> KVCache:
    """The cache constrained to the sharding of CACHE_AXES (nothing without an active mesh)."""
    return KVCache(*(constrain(a, CACHE_AXES[f]) for f, a in zip(KVCache._fields, cache)))


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    dt = dtype_of(cfg.dtype)
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_size)
    z = jnp.zeros((batch, length), jnp.int32)
    return _laid_out(KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), z, z))


def _rows_of(pos, groups, segment_id, length):
    """Rows for slot positions pos [B, C] (-1 = empty: segment 0, position clamped for RoPE)."""
    ok = pos >= 0
    safe = jnp.clip(pos, 0, length - 1)
    g = jnp.broadcast_to(groups, pos.shape).astype(jnp.int32)
    seg = jnp.where(ok, segment_id, 0).astype(jnp.int32)
    return Rows(safe.astype(jnp.int32), g, seg), safe


def write(cache: KVCache, kv, pos, groups, segment_id=1) -> KVCache:
    """Writes new rows' (k, v) [L, B, C, Hkv, D] into slots pos [B, C] (-1 = skip) with their ids."""
    b, c = pos.shape
    length = cache.groups.shape[1]
    slot = jnp.where(pos >= 0, pos, length)  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, c))
    k = cache.k.at[:, rows, slot].set(kv[0].astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, slot].set(kv[1].astype(cache.v.dtype), mode="drop")
    g = cache.groups.at[rows, slot].set(jnp.broadcast_to(groups, (b, c)).astype(jnp.int32), mode="drop")
    s = cache.segments.at[rows, slot].set(jnp.full((b, c), segment_id, jnp.int32), mode="drop")
    return _laid_out(KVCache(k, v, g, s))


def release(cache: KVCache, pos) -> KVCache:
    """Marks slots pos [B, C] (-1 = skip) empty (segment 0: invisible); their keys/values stay until
    a `write` replaces them. Speculative decoding frees the slots of rejected drafts this way."""
    b, c = pos.shape
    length = cache.groups.shape[1]
    slot = jnp.where(pos >= 0, pos, length)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, c))
    seg = cache.segments.at[rows, slot].set(0, mode="drop")
    return _laid_out(cache._replace(segments=seg))


def prefill(cfg: ModelConfig, params, tokens, known_pos, known_groups) -> KVCache:
    """Encodes the known tokens once: content rows at known_pos [B, P] (-1 = none) with group ids
    known_groups [B, P]; returns the cache with their keys/values in their slots."""
    b, t = tokens.shape
    rows, safe = _rows_of(known_pos, known_groups, 1, t)
    c_tok = jnp.take_along_axis(tokens, safe, axis=1)
    _, _, kv = run_rows(cfg, params, c_tok, rows, None, cache=None, need_content=False, return_kv=True)
    return write(empty_cache(cfg, b, t), kv, known_pos, known_groups)


def cached_step_logits(cfg: ModelConfig, params, cache: KVCache, tokens, new_pos, new_group, q_pos, q_valid,
                       q_group):
    """One cached step. new_pos [B, C]: slots committed at the previous step (-1 = none), all with
    group id new_group (their tokens are read from `tokens`); q_pos [B, Q] with q_valid [B, Q]: the
    positions asked about, with group id q_group > new_group. Returns (logits [B, Q, V] float32,
    updated cache)."""
    b, t = tokens.shape
    # One kernel for the whole step: every layer's rows see the cache's slots plus the new content rows.
    num_keys = cache.groups.shape[1] + new_pos.shape[1]
    kind = choose_kernel(cfg, num_keys, step_rows=new_pos.shape[1] + q_pos.shape[1])
    cfg = dataclasses.replace(cfg, attention=kind)
    c_rows, c_safe = _rows_of(new_pos, new_group, 1, t)
    c_tok = jnp.take_along_axis(tokens, c_safe, axis=1)
    q_rows, _ = _rows_of(jnp.where(q_valid, q_pos, -1), q_group, 1, t)
    _, hq, kv = run_rows(cfg, params, c_tok, c_rows, q_rows, cache=cache, need_content=False, return_kv=True)
    logits = lm_logits(cfg, params, hq)
    return logits, write(cache, kv, new_pos, new_group)


def full_step_logits(cfg: ModelConfig, params, tokens, groups, segments, q_pos):
    """The uncached baseline: one full forward (both streams over all T rows) with the given group ids;
    returns the query-stream logits at q_pos [B, Q] (clamped; callers mask invalid slots)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits = apply_model(cfg, params, tokens, positions, groups, segments, "query")
    safe = jnp.clip(q_pos, 0, t - 1)
    return jnp.take_along_axis(logits, safe[..., None], axis=1)


def commit_rows(cfg: ModelConfig, params, cache: KVCache, tokens, new_pos, new_group) -> KVCache:
    """Content rows only: the tokens at slots new_pos [B, C] (-1 = none; group id new_group) enter the
    cache, no query rows run. Used where a decode loop narrows its row count (a3jax.decode.dynamic's
    phases): the last step's commits are written before the narrower loop starts."""
    b, t = tokens.shape
    kind = choose_kernel(cfg, cache.groups.shape[1] + new_pos.shape[1], step_rows=new_pos.shape[1])
    cfg = dataclasses.replace(cfg, attention=kind)
    c_rows, c_safe = _rows_of(new_pos, new_group, 1, t)
    c_tok = jnp.take_along_axis(tokens, c_safe, axis=1)
    _, _, kv = run_rows(cfg, params, c_tok, c_rows, None, cache=cache, need_content=False, return_kv=True)
    return write(cache, kv, new_pos, new_group)
