"""Attention kernels for the A3 rule (a3jax.masks), GQA without repeating K/V.

All kernels take q [B, Tq, H, D], k/v [B, Tk, Hkv, D], the rows' attend-up-to group ids
(`masks.stream_groups`) and segment ids, and the keys' group and segment ids. A row that sees no key
gets a zero output.

* `dense`: the reference. The boolean mask is built inside jit from the ids.
* `blockwise`: flash-style online softmax over key blocks with a hand-written backward
  (jax.custom_vjp), so memory is linear in T for a fixed block size. For each query block it visits
  only the key-block range `masks.block_ranges` returns; with the sorted generation-order layout that
  skips every block the rule hides (about half of them for a causal-like layout).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from a3jax import masks
from a3jax.model.pallas_attention import pallas_attention, target_platform

NEG = -1e30


def _split_heads(q, num_kv_heads):
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def dense_attention(q, k, v, q_groups, q_segments, k_groups, k_segments):
    b, tq, h, d = q.shape
    qh = _split_heads(q, k.shape[2])
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qh, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    mask = masks.visible(q_groups, q_segments, k_groups, k_segments, strict=False)[:, None, None]
    s = jnp.where(mask, s, NEG)
    p = jnp.exp(s - s.max(-1, keepdims=True)) * mask
    denom = p.sum(-1)  # [b, hkv, g, q]
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    denom = jnp.moveaxis(denom, -1, 1)[..., None]  # [b, q, hkv, g, 1]
    o = jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)
    return o.reshape(b, tq, h, d).astype(q.dtype)


def _pad_to(x, mult, axis, value=0):
    t = x.shape[axis]
    extra = (-t) % mult
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_q=128, block_k=128):
    b, tq, h, d = q.shape
    tk = k.shape[1]
    block_q, block_k = min(block_q, tq), min(block_k, tk)
    # Padding rows/keys get segment 0: they see nothing and nobody sees them.
    qp = _pad_to(_split_heads(q, k.shape[2]), block_q, 1)
    qg, qs = _pad_to(q_groups, block_q, 1), _pad_to(q_segments, block_q, 1)
    kp, vp = _pad_to(k, block_k, 1), _pad_to(v, block_k, 1)
    kg, ks = _pad_to(k_groups, block_k, 1), _pad_to(k_segments, block_k, 1)
    lo, hi = masks.block_ranges(qg, qs, kg, ks, block_q, block_k)
    out = _flash(qp, kp, vp, qg.astype(jnp.int32), qs.astype(jnp.int32), kg.astype(jnp.int32),
                 ks.astype(jnp.int32), lo, hi, block_q, block_k)
    return out[:, :tq].reshape(b, tq, h, d)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _scores(qi, kj, qgi, qsi, kgj, ksj, scale):
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
    mask = masks.visible(qgi, qsi, kgj, ksj, strict=False)[:, None, None]
    return jnp.where(mask, s, NEG), mask


def _flash_forward(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    b, tq, hkv, g, d = q.shape
    scale = d ** -0.5

    def q_block(i):
        qi = _slice(q, i * bq, bq, 1)
        qgi, qsi = _slice(qg, i * bq, bq, 1), _slice(qs, i * bq, bq, 1)

        def body(j, carry):
            o, m, l = carry
            kj, vj = _slice(k, j * bk, bk, 1), _slice(v, j * bk, bk, 1)
            s, mask = _scores(qi, kj, qgi, qsi, _slice(kg, j * bk, bk, 1), _slice(ks, j * bk, bk, 1), scale)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None]) * mask
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            o = o * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
            return o, m_new, l

        init = (jnp.zeros((b, bq, hkv, g, d), jnp.float32),
                jnp.full((b, hkv, g, bq), NEG, jnp.float32),
                jnp.zeros((b, hkv, g, bq), jnp.float32))
        o, m, l = jax.lax.fori_loop(lo[i], hi[i], body, init)
        lt = jnp.moveaxis(l, -1, 1)[..., None]
        o = jnp.where(lt > 0, o / jnp.where(lt > 0, lt, 1.0), 0.0)
        # Rows that saw nothing get lse=+inf-ish so the backward's exp(s - lse) is 0 there.
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -NEG)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, jnp.arange(tq // bq))  # [nq, b, bq, ...], [nq, b, hkv, g, bq]
    o = jnp.moveaxis(o, 0, 1).reshape(b, tq, hkv, g, d)
    lse = jnp.moveaxis(lse, 0, -2).reshape(b, hkv, g, tq)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _flash(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    return _flash_forward(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk)[0]


def _flash_fwd(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    o, lse = _flash_forward(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk)
    return o, (q, k, v, qg, qs, kg, ks, lo, hi, o, lse)


def _flash_bwd(bq, bk, res, do):
    q, k, v, qg, qs, kg, ks, lo, hi, o, lse = res
    b, tq, hkv, g, d = q.shape
    scale = d ** -0.5
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", do.astype(jnp.float32), o.astype(jnp.float32))

    def q_block(i, carry):
        dq, dk, dv = carry
        qi, doi = _slice(q, i * bq, bq, 1), _slice(do, i * bq, bq, 1)
        qgi, qsi = _slice(qg, i * bq, bq, 1), _slice(qs, i * bq, bq, 1)
        lsei, deltai = _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3)

        def body(j, inner):
            dqi, dk, dv = inner
            kj, vj = _slice(k, j * bk, bk, 1), _slice(v, j * bk, bk, 1)
            s, mask = _scores(qi, kj, qgi, qsi, _slice(kg, j * bk, bk, 1), _slice(ks, j * bk, bk, 1), scale)
            p = jnp.exp(s - lsei[..., None]) * mask
            dvj = jnp.einsum("bhgqk,bqhgd->bkhd", p, doi.astype(jnp.float32))
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - deltai[..., None]) * scale
            dqi = dqi + jnp.einsum("bhgqk,bkhd->bqhgd", ds, kj.astype(jnp.float32))
            dkj = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qi.astype(jnp.float32))
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _slice(dk, j * bk, bk, 1) + dkj, j * bk, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _slice(dv, j * bk, bk, 1) + dvj, j * bk, 1)
            return dqi, dk, dv

        dqi = jnp.zeros((b, bq, hkv, g, d), jnp.float32)
        dqi, dk, dv = jax.lax.fori_loop(lo[i], hi[i], body, (dqi, dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * bq, 1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, tq // bq, q_block, init)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(kind: str, q, k, v, q_groups, q_segments, k_groups, k_segments, block_size: int = 128):
    """Dispatch by kind ('dense' | 'blockwise' | 'pallas'; 'auto' is resolved by the caller, see choose_kernel)."""
    if kind == "dense":
        return dense_attention(q, k, v, q_groups, q_segments, k_groups, k_segments)
    if kind == "blockwise":
        return blockwise_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_size, block_size)
    if kind == "pallas":  # the fused kernel (a3jax.model.pallas_attention); interpret mode off TPU
        return pallas_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_size, block_size)
    raise ValueError(f"unknown attention kind {kind!r}")


# The `auto` policy's thresholds (see choose_kernel).
BLOCKWISE_MIN_KEYS = 128
DENSE_MAX_STEP_ROWS = 256


def choose_kernel(cfg, num_keys: int, step_rows: int | None = None) -> str:
    """The kernel for `cfg.attention`; the one place `auto` is resolved.

    `num_keys`: the keys each row attends over. `step_rows`: for one cached decoding step (rows run
    against a KV cache), the number of those rows (new content rows plus query rows); None for a
    forward over a whole layout (training, prefill, the uncached decoder).

    `auto`: a cached step of at most 256 rows runs dense (a few rows against the cache: one masked
    matmul beats the blockwise loop); otherwise blockwise from 128 keys up, dense below. On CPU the
    blockwise fwd+bwd was faster even at 128-256 keys (its hand-written backward keeps less than
    autodiff of the dense softmax) and its memory is linear in T; for a few dozen keys the dense single
    matmul wins. See docs/benchmarks.md."""
    if cfg.attention != "auto":
        return cfg.attention
    # TPU (issue 16): the fused Pallas kernel, for training, prefill and cached steps alike. GPU: the
    # policy below (blockwise is XLA-fused there too; cuDNN's fused attention cannot take per-example
    # A3 groups without a dense T x T mask); GPU speed is unmeasured (docs/benchmarks.md).
    if target_platform() == "tpu":
        return "pallas"
    if step_rows is not None and step_rows <= DENSE_MAX_STEP_ROWS:
        return "dense"
    return "blockwise" if num_keys >= BLOCKWISE_MIN_KEYS else "dense"
