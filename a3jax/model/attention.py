"""Attention kernels for the A3 rule (a3jax.masks), GQA without repeating K/V.

All kernels take q [B, Tq, H, D], k/v [B, Tk, Hkv, D], the rows' attend-up-to group ids
(`masks.stream_groups`) and segment ids, and the keys' group and segment ids. A row that sees no key
gets a zero output.

* `dense`: the reference. The boolean mask is built inside jit from the ids.
* `blockwise`: flash-style online softmax over key blocks with a hand-written backward
  (jax.custom_vjp), so memory is linear in T for a fixed block size. For each query block it visits
  only the key-block range `masks.block_visibility` returns; with the sorted generation-order layout
  that skips every block the rule hides (about half of them for a causal-like layout), and the fully
  visible blocks (all but the diagonal there) run without building or applying a mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from a3jax import masks
from a3jax.model.pallas_attention import pallas_attention, target_platform
from a3jax.model.pallas_gpu_attention import pallas_gpu_attention

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
    tk, hkv = k.shape[1], k.shape[2]
    block_q, block_k = min(block_q, tq), min(block_k, tk)
    # Padding rows/keys get segment 0: they see nothing and nobody sees them.
    qg, qs = _pad_to(q_groups, block_q, 1), _pad_to(q_segments, block_q, 1)
    kg, ks = _pad_to(k_groups, block_k, 1), _pad_to(k_segments, block_k, 1)
    lo, mid, hi = masks.block_visibility(qg, qs, kg, ks, block_q, block_k)
    # Heads-major inside the kernel ([b, hkv, g, T, d], [b, hkv, T, d]): every tile product is then a
    # plain batched matmul, with no per-tile transposes. Transposed once here, outside the loops.
    qh = _pad_to(_split_heads(q, hkv), block_q, 1).transpose(0, 2, 3, 1, 4)
    kh = _pad_to(k, block_k, 1).transpose(0, 2, 1, 3)
    vh = _pad_to(v, block_k, 1).transpose(0, 2, 1, 3)
    out = _flash(qh, kh, vh, qg.astype(jnp.int32), qs.astype(jnp.int32), kg.astype(jnp.int32),
                 ks.astype(jnp.int32), lo, mid, hi, block_q, block_k)
    return out.transpose(0, 3, 1, 2, 4)[:, :tq].reshape(b, tq, h, d)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _tile_scores(qi, kj):
    """[b, hkv, g, bq, bk] fp32 scores of a (pre-scaled) query tile against a key tile."""
    return jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32)


def _tile_mask(qgi, qsi, kgj, ksj):
    return masks.visible(qgi, qsi, kgj, ksj, strict=False)[:, None, None]


def _flash_forward(q, k, v, qg, qs, kg, ks, lo, mid, hi, bq, bk):
    """q [b, hkv, g, Tq, d], k/v [b, hkv, Tk, d] -> o like q, lse [b, hkv, g, Tq].

    Key blocks [lo, mid) of a query block are fully visible: no mask is built or applied there;
    [mid, hi) are masked exactly; the rest are skipped."""
    b, hkv, g, tq, d = q.shape
    q = q * jnp.asarray(d ** -0.5, q.dtype)

    def q_block(i):
        qi = _slice(q, i * bq, bq, 3)
        qgi, qsi = _slice(qg, i * bq, bq, 1), _slice(qs, i * bq, bq, 1)

        def step(j, carry, masked):
            o, m, l = carry
            kj, vj = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
            s = _tile_scores(qi, kj)
            if masked:
                mask = _tile_mask(qgi, qsi, _slice(kg, j * bk, bk, 1), _slice(ks, j * bk, bk, 1))
                s = jnp.where(mask, s, NEG)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            if masked:  # a row that has seen nothing yet has m_new == NEG and exp(0) == 1
                p = jnp.where(mask, p, 0.0)
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return o * alpha[..., None] + pv, m_new, l

        carry = (jnp.zeros((b, hkv, g, bq, d), jnp.float32),
                 jnp.full((b, hkv, g, bq), NEG, jnp.float32),
                 jnp.zeros((b, hkv, g, bq), jnp.float32))
        carry = jax.lax.fori_loop(lo[i], mid[i], functools.partial(step, masked=False), carry)
        o, m, l = jax.lax.fori_loop(mid[i], hi[i], functools.partial(step, masked=True), carry)
        o = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        # Rows that saw nothing get lse=+inf-ish so the backward's exp(s - lse) is 0 there.
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -NEG)
        return o.astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, jnp.arange(tq // bq))  # [nq, b, hkv, g, bq, (d)]
    o = jnp.moveaxis(o, 0, 3).reshape(b, hkv, g, tq, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, tq)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _flash(q, k, v, qg, qs, kg, ks, lo, mid, hi, bq, bk):
    return _flash_forward(q, k, v, qg, qs, kg, ks, lo, mid, hi, bq, bk)[0]


def _flash_fwd(q, k, v, qg, qs, kg, ks, lo, mid, hi, bq, bk):
    o, lse = _flash_forward(q, k, v, qg, qs, kg, ks, lo, mid, hi, bq, bk)
    return o, (q, k, v, qg, qs, kg, ks, lo, mid, hi, o, lse)


def _flash_bwd(bq, bk, res, do):
    q, k, v, qg, qs, kg, ks, lo, mid, hi, o, lse = res
    b, hkv, g, tq, d = q.shape
    scale = d ** -0.5
    qsc = q * jnp.asarray(scale, q.dtype)
    delta = jnp.einsum("bhgqd,bhgqd->bhgq", do.astype(jnp.float32), o.astype(jnp.float32))
    f32 = lambda x: x.astype(jnp.float32)

    def q_block(i, carry):
        dq, dk, dv = carry
        qi, doi = _slice(qsc, i * bq, bq, 3), _slice(do, i * bq, bq, 3)
        qgi, qsi = _slice(qg, i * bq, bq, 1), _slice(qs, i * bq, bq, 1)
        lsei, deltai = _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3)

        def step(j, inner, masked):
            dqi, dkt, dvt = inner
            kj, vj = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
            s = _tile_scores(qi, kj)
            if masked:  # exp(NEG - lse) == 0, also for rows that see nothing (lse = -NEG)
                s = jnp.where(_tile_mask(qgi, qsi, _slice(kg, j * bk, bk, 1), _slice(ks, j * bk, bk, 1)), s, NEG)
            p = jnp.exp(s - lsei[..., None])
            # dK, dV are accumulated transposed ([.., d, Tk]): the tile products then read p and ds
            # in the layout they are made in, and only the small [bq, d] operands get transposed.
            dvtj = jnp.einsum("bhgqd,bhgqk->bhdk", f32(doi), p)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - deltai[..., None])  # d loss / d (scaled scores)
            dqi = dqi + jnp.einsum("bhgqk,bhkd->bhgqd", ds, f32(kj))
            dktj = jnp.einsum("bhgqd,bhgqk->bhdk", f32(qi), ds)
            dkt = jax.lax.dynamic_update_slice_in_dim(dkt, _slice(dkt, j * bk, bk, 3) + dktj, j * bk, 3)
            dvt = jax.lax.dynamic_update_slice_in_dim(dvt, _slice(dvt, j * bk, bk, 3) + dvtj, j * bk, 3)
            return dqi, dkt, dvt

        inner = (jnp.zeros((b, hkv, g, bq, d), jnp.float32), dk, dv)
        inner = jax.lax.fori_loop(lo[i], mid[i], functools.partial(step, masked=False), inner)
        dqi, dk, dv = jax.lax.fori_loop(mid[i], hi[i], functools.partial(step, masked=True), inner)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dqi, i * bq, 3)
        return dq, dk, dv

    tk = k.shape[2]
    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((b, hkv, d, tk), jnp.float32),
            jnp.zeros((b, hkv, d, tk), jnp.float32))
    dq, dkt, dvt = jax.lax.fori_loop(0, tq // bq, q_block, init)
    dk, dv = dkt.transpose(0, 1, 3, 2), dvt.transpose(0, 1, 3, 2)
    dq = dq * scale  # scores were taken with the pre-scaled q
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + (None,) * 7


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(kind: str, q, k, v, q_groups, q_segments, k_groups, k_segments, block_size: int = 128):
    """Dispatch by kind ('dense' | 'blockwise' | 'pallas' | 'pallas_gpu'; 'auto' is resolved by the
    caller, see choose_kernel)."""
    if kind == "dense":
        return dense_attention(q, k, v, q_groups, q_segments, k_groups, k_segments)
    if kind == "blockwise":
        return blockwise_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_size, block_size)
    if kind == "pallas":  # the fused kernel (a3jax.model.pallas_attention); interpret mode off TPU
        return pallas_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_size, block_size)
    if kind == "pallas_gpu":  # the fused GPU kernel (a3jax.model.pallas_gpu_attention); interpret mode off GPU
        return pallas_gpu_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_size)
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
    matmul beats the blockwise loop); otherwise blockwise from 128 keys up, dense below. Measured on
    CPU (docs/performance.md): blockwise fwd+bwd is 6.5x faster than dense at 1024 keys and
    on par at 128 (one key block), and its memory is linear in T; for a few dozen keys the dense
    single matmul wins."""
    if cfg.attention != "auto":
        return cfg.attention
    # TPU and GPU: the platform's fused Pallas kernel, for training, prefill and cached steps alike
    # (cuDNN's fused attention cannot take per-example A3 groups without a dense T x T mask).
    platform = target_platform()
    if platform == "tpu":
        return "pallas"
    if platform == "gpu":
        return "pallas_gpu"
    if step_rows is not None and step_rows <= DENSE_MAX_STEP_ROWS:
        return "dense"
    return "blockwise" if num_keys >= BLOCKWISE_MIN_KEYS else "dense"
