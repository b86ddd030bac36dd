"""`attention: pallas`: a fused flash-attention kernel for TPU (Pallas / Mosaic) with the A3 rule.

No stock kernel expresses the A3 rule with per-example groups in O(T) memory (splash attention's
masks are static and shared by every example; its segment ids only compare for equality), so this
is our own. Same contract as the other kernels (a3jax.model.attention): q [B, Tq, H, D], k/v
[B, Tk, Hkv, D], the rows' attend-up-to group and segment ids, the keys' group and segment ids; a key
is visible when the segments match (non-zero) and key group <= row group (`masks.visible`).

* GQA without repeating K/V: query head h reads kv head h // (H / Hkv) through the BlockSpec index map.
* Block skipping: per example and query block, `masks.block_ranges` gives the [lo, hi) range of key
  blocks that can hold a visible key (from per-block min/max group and segment ids); the ranges go
  to the kernel as scalar prefetch, steps outside the range do no work, and the index maps clamp the
  block index into the range so a skipped step issues no new DMA either. With the sorted
  generation-order layout this skips every block the rule hides.
* Exact masking inside a block; rows that see nothing output exactly zero (their lse is +1e30, so
  the backward's exp(s - lse) is zero there too). fp32 accumulation for bf16 or fp32 inputs.
* Any T: rows and keys are padded internally with segment 0 (never visible, never seeing).
* jax.custom_vjp with two backward kernels: dq (grid over query blocks, reducing over key blocks)
  and dk/dv (grid over kv heads x key blocks, reducing over the query heads of the group and the
  query blocks that see the key block). delta = rowsum(dO * O) is one XLA reduction outside.
* Decode shapes (a few query rows against a long cache): the query block shrinks to the rows
  (rounded up to 16) and the grid walks the cache's key blocks.
* Per-row statistics (lse, delta) are kept lane-dense in HBM ([B, H, 1, T]); inside the kernel a
  column is turned into a row and back with an identity-mask reduction (exact: one non-zero term).
* Under a mesh (`a3jax.sharding.activate`) the kernel runs per shard (shard_map): batch over the
  batch axes, heads over the tensor axis when both head counts divide; otherwise XLA would replicate
  the custom call.

Off TPU the same kernel runs in Pallas' TPU interpret mode (slow; tests and checks). `compile_target`
tells the kernel (and `choose_kernel`) that the program being traced is for TPU even though this host
is a CPU (`a3jax compile`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from a3jax import masks, sharding

NEG = -1e30          # score of a hidden key
EMPTY_LSE = 1e30     # lse of a row that sees nothing: exp(s - lse) == 0 in the backward
LANES = 128          # key blocks are a multiple of the TPU lane width (key ids are rows [1, bk])
SUBLANES = 16        # query blocks are a multiple of the bf16 sublane tile

_TARGET: contextvars.ContextVar = contextvars.ContextVar("a3jax_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str):
    """Trace for `platform` ('tpu', 'gpu', 'cpu') regardless of this host's backend."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform being traced for: `compile_target`'s, else JAX's default backend ('cuda'/'rocm' -> 'gpu')."""
    p = _TARGET.get() or jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def round_up(x: int, m: int) -> int:
    """x rounded up to a multiple of m."""
    return -(-x // m) * m


def block_sizes(tq: int, tk: int, block_q: int = 128, block_k: int = 128) -> tuple[int, int]:
    """(bq, bk) the kernel uses for Tq rows and Tk keys: bq a multiple of 16 no larger than the
    (rounded) rows, bk a multiple of 128."""
    bq = min(round_up(max(block_q, 1), SUBLANES), round_up(tq, SUBLANES))
    bk = min(round_up(max(block_k, 1), LANES), round_up(tk, LANES))
    return bq, bk


# ----------------------------------------------------------------------------- in-kernel helpers


def _col_to_row(col):
    """[n, 1] -> [1, n] (exact: each output sums one non-zero term)."""
    n = col.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.where(eye, col, 0).sum(0, keepdims=True)


def _row_to_col(row):
    """[1, n] -> [n, 1]."""
    n = row.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.where(eye, row, 0).sum(1, keepdims=True)


def _scores(q, k, qg, qs, kg, ks, scale):
    """Masked scores [bq, bk] (fp32) and the visibility mask (masks.visible, strict=False)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    mask = jnp.logical_and(jnp.logical_and(qs == ks, qs != 0), kg <= qg)  # [bq,1] vs [1,bk]
    return jnp.where(mask, s, NEG), mask


def _in_range(lo_ref, hi_ref, idx, j):
    return jnp.logical_and(j >= lo_ref[idx], j < hi_ref[idx])


def _clamp(j, lo, hi, n):
    """A block index inside [lo, hi) (and [0, n)): outside the range the previous block is kept, so
    the pipeline issues no new copy for a skipped step."""
    return jnp.clip(jnp.minimum(jnp.maximum(j, lo), hi - 1), 0, n - 1)


def _key_block_maps(g, nq, nk):
    """Index maps for a grid (b, h, i, j) over query blocks i and key blocks j: (kv_map, kid_map) pick
    key block j of query head h's kv head (K/V) and of the key ids, clamped to the block range of
    example b's query block i (shared by the forward and the dq kernels)."""

    def kv_map(bi, hi_, i, j, lo_ref, hi_ref):
        idx = bi * nq + i
        return bi, lax.div(hi_, g), _clamp(j, lo_ref[idx], hi_ref[idx], nk), 0

    def kid_map(bi, hi_, i, j, lo_ref, hi_ref):
        idx = bi * nq + i
        return bi, 0, _clamp(j, lo_ref[idx], hi_ref[idx], nk)

    return kv_map, kid_map


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qg_ref, qs_ref, kg_ref, ks_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_in_range(lo_ref, hi_ref, b * nq + i, j))
    def _step():
        s, mask = _scores(q_ref[...], k_ref[...], qg_ref[...], qs_ref[...], kg_ref[...], ks_ref[...], scale)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_sc[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(jnp.where(seen, m_sc[...] + jnp.log(safe), EMPTY_LSE))


def _interpret():
    return target_platform() != "tpu"


def _cost(flops, transcendentals, *arrays):
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                           bytes_accessed=int(sum(a.size * a.dtype.itemsize for a in arrays)))


def _fwd_call(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D], qg/qs [B, Tq, 1], kg/ks [B, 1, Tk] (all padded);
    lo/hi [B * nq]. Returns o [B, H, Tq, D] and lse [B, H, 1, Tq] (fp32)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g, nq, nk = h // hkv, tq // bq, tk // bk

    kv_map, kid_map = _key_block_maps(g, nq, nk)

    q_map = lambda bi, hi_, i, j, *_: (bi, hi_, i, 0)
    qid_map = lambda bi, hi_, i, j, *_: (bi, i, 0)
    lse_map = lambda bi, hi_, i, j, *_: (bi, hi_, 0, i)
    kernel = functools.partial(_fwd_kernel, scale=d ** -0.5, nq=nq, nk=nk)
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, tq), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, nq, nk),
            in_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                      pl.BlockSpec((None, None, bk, d), kv_map),
                      pl.BlockSpec((None, None, bk, d), kv_map),
                      pl.BlockSpec((None, bq, 1), qid_map), pl.BlockSpec((None, bq, 1), qid_map),
                      pl.BlockSpec((None, 1, bk), kid_map), pl.BlockSpec((None, 1, bk), kid_map)],
            out_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, 1, bq), lse_map)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        # Every block of the grid (an upper bound: with the sorted layout about half are skipped).
        cost_estimate=_cost(4 * b * h * tq * tk * d, b * h * tq * tk, q, k, v, qg, qs, kg, ks, *out_shape),
        interpret=_interpret(),
    )(lo, hi, q, k, v, qg, qs, kg, ks)


# ----------------------------------------------------------------------------- backward kernels


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qg_ref, qs_ref, kg_ref, ks_ref,
               dq_ref, dq_sc, lse_sc, delta_sc, *, scale, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        lse_sc[...] = _row_to_col(lse_ref[...])
        delta_sc[...] = _row_to_col(delta_ref[...])

    @pl.when(_in_range(lo_ref, hi_ref, b * nq + i, j))
    def _step():
        k = k_ref[...]
        s, mask = _scores(q_ref[...], k, qg_ref[...], qs_ref[...], kg_ref[...], ks_ref[...], scale)
        p = jnp.where(mask, jnp.exp(s - lse_sc[...]), 0.0)
        do = do_ref[...]
        dp = lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta_sc[...]) * scale
        dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, qlo_ref, qhi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qg_ref, qs_ref,
                kg_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, nq, groups):
    b, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(gi == 0, i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    # The same (query block, key block) pairs the forward visited.
    @pl.when(_in_range(lo_ref, hi_ref, b * nq + i, j))
    def _step():
        q, k, do = q_ref[...], k_ref[...], do_ref[...]
        s, mask = _scores(q, k, qg_ref[...], qs_ref[...], kg_ref[...], ks_ref[...], scale)
        p = jnp.where(mask, jnp.exp(s - _row_to_col(lse_ref[...])), 0.0)
        dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - _row_to_col(delta_ref[...])) * scale
        dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(gi == groups - 1, i == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _query_ranges(lo, hi, nq, nk):
    """Per example and key block, the [qlo, qhi) hull of query blocks whose key range holds it."""
    b = lo.shape[0] // nq
    lo, hi = lo.reshape(b, nq, 1), hi.reshape(b, nq, 1)
    j = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
    hit = (lo <= j) & (j < hi)  # [b, nq, nk]
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    qlo = jnp.where(hit, i, nq).min(1)
    qhi = jnp.maximum(jnp.where(hit, i + 1, 0).max(1), qlo)
    return qlo.reshape(-1).astype(jnp.int32), qhi.reshape(-1).astype(jnp.int32)


def _bwd_calls(q, k, v, qg, qs, kg, ks, lo, hi, o, lse, do, bq, bk):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g, nq, nk = h // hkv, tq // bq, tk // bk
    scale = d ** -0.5
    delta = jnp.einsum("bhtd,bhtd->bht", do.astype(jnp.float32), o.astype(jnp.float32))[:, :, None, :]

    # dq: grid (b, h, i, j), like the forward.
    kv_map, kid_map = _key_block_maps(g, nq, nk)

    q_map = lambda bi, hi_, i, j, *_: (bi, hi_, i, 0)
    row_map = lambda bi, hi_, i, j, *_: (bi, hi_, 0, i)
    qid_map = lambda bi, hi_, i, j, *_: (bi, i, 0)
    qspec, kvspec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)
    rowspec = pl.BlockSpec((None, None, 1, bq), row_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, nq, nk),
            in_specs=[qspec, kvspec, kvspec, qspec, rowspec, rowspec,
                      pl.BlockSpec((None, bq, 1), qid_map), pl.BlockSpec((None, bq, 1), qid_map),
                      pl.BlockSpec((None, 1, bk), kid_map), pl.BlockSpec((None, 1, bk), kid_map)],
            out_specs=qspec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, 1), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(6 * b * h * tq * tk * d, b * h * tq * tk, q, k, v, do, lse, delta, q),
        interpret=_interpret(),
    )(lo, hi, q, k, v, do, lse, delta, qg, qs, kg, ks)

    # dk, dv: grid (b, hkv, j, g, i); the query block walks the hull of blocks that see key block j.
    qlo, qhi = _query_ranges(lo, hi, nq, nk)

    def qq_map(bi, hk, j, gi, i, lo_ref, hi_ref, qlo_ref, qhi_ref):
        idx = bi * nk + j
        return bi, hk * g + gi, _clamp(i, qlo_ref[idx], qhi_ref[idx], nq), 0

    def qrow_map(bi, hk, j, gi, i, lo_ref, hi_ref, qlo_ref, qhi_ref):
        idx = bi * nk + j
        return bi, hk * g + gi, 0, _clamp(i, qlo_ref[idx], qhi_ref[idx], nq)

    def qqid_map(bi, hk, j, gi, i, lo_ref, hi_ref, qlo_ref, qhi_ref):
        idx = bi * nk + j
        return bi, _clamp(i, qlo_ref[idx], qhi_ref[idx], nq), 0

    k_map = lambda bi, hk, j, gi, i, *_: (bi, hk, j, 0)
    kk_map = lambda bi, hk, j, gi, i, *_: (bi, 0, j)
    qspec2, kspec2 = pl.BlockSpec((None, None, bq, d), qq_map), pl.BlockSpec((None, None, bk, d), k_map)
    rowspec2 = pl.BlockSpec((None, None, 1, bq), qrow_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, nq=nq, groups=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, hkv, nk, g, nq),
            in_specs=[qspec2, kspec2, kspec2, qspec2, rowspec2, rowspec2,
                      pl.BlockSpec((None, bq, 1), qqid_map), pl.BlockSpec((None, bq, 1), qqid_map),
                      pl.BlockSpec((None, 1, bk), kk_map), pl.BlockSpec((None, 1, bk), kk_map)],
            out_specs=[kspec2, kspec2],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(8 * b * h * tq * tk * d, b * h * tq * tk, q, k, v, do, lse, delta, k, v),
        interpret=_interpret(),
    )(lo, hi, qlo, qhi, q, k, v, do, lse, delta, qg, qs, kg, ks)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    return _fwd_call(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk)[0]


def _fused_fwd(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk):
    o, lse = _fwd_call(q, k, v, qg, qs, kg, ks, lo, hi, bq, bk)
    return o, (q, k, v, qg, qs, kg, ks, lo, hi, o, lse)


def _fused_bwd(bq, bk, res, do):
    q, k, v, qg, qs, kg, ks, lo, hi, o, lse = res
    dq, dk, dv = _bwd_calls(q, k, v, qg, qs, kg, ks, lo, hi, o, lse, do, bq, bk)
    return dq, dk, dv, None, None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- entry point


def pad_axis(x, size, axis):
    """x zero-padded at the end of `axis` to `size` (zeros: padding rows/keys get segment 0)."""
    extra = size - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def kernel_ranges(q_groups, q_segments, k_groups, k_segments, bq: int, bk: int):
    """Per example and query block, the [lo, hi) key blocks the kernel visits: int32 [B, nq] each
    (`masks.block_ranges` of each example alone). Ids are padded to the block multiples."""
    one = lambda a, c, e, f: masks.block_ranges(a[None], c[None], e[None], f[None], bq, bk)
    return jax.vmap(one)(q_groups, q_segments, k_groups, k_segments)


def _local_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_q, block_k):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"pallas attention: {h} query heads are not a multiple of {hkv} kv heads")
    bq, bk = block_sizes(tq, tk, block_q, block_k)
    tqp, tkp = round_up(tq, bq), round_up(tk, bk)
    i32 = lambda x: x.astype(jnp.int32)
    qg, qs = pad_axis(i32(q_groups), tqp, 1), pad_axis(i32(q_segments), tqp, 1)
    kg, ks = pad_axis(i32(k_groups), tkp, 1), pad_axis(i32(k_segments), tkp, 1)
    # Per-example ranges: each example skips what its own layout hides.
    lo, hi = kernel_ranges(qg, qs, kg, ks, bq, bk)
    qt = jnp.swapaxes(pad_axis(q, tqp, 1), 1, 2)  # [B, H, Tq, D]
    kt = jnp.swapaxes(pad_axis(k, tkp, 1), 1, 2)
    vt = jnp.swapaxes(pad_axis(v, tkp, 1), 1, 2)
    o = _fused(qt, kt, vt, qg[:, :, None], qs[:, :, None], kg[:, None, :], ks[:, None, :],
               lo.reshape(-1), hi.reshape(-1), bq, bk)
    return jnp.swapaxes(o, 1, 2)[:, :tq]


def _shard_specs(q, k):
    """(q spec, k spec, ids spec) for shard_map under the active mesh, or None without one."""
    active = sharding.active()
    if active is None or active[0].size == 1:
        return None
    mesh, rules = active
    bspec = sharding.logical_to_spec(("batch",), q.shape[:1], mesh, rules)[0]
    hq = sharding.logical_to_spec(("act_heads",), q.shape[2:3], mesh, rules)[0]
    hk = sharding.logical_to_spec(("act_kv_heads",), k.shape[2:3], mesh, rules)[0]
    heads = hq if hq == hk else None  # GQA grouping stays local only when both split the same way
    if heads is not None and bspec is not None and set(_axes(heads)) & set(_axes(bspec)):
        heads = None
    return mesh, P(bspec, None, heads, None), P(bspec, None)


def _axes(spec_entry):
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry or ())


def run_per_shard(fn, q, k, v, q_groups, q_segments, k_groups, k_segments):
    """fn(q, k, v, ids...) (an attention kernel on local arrays), run per shard under the active mesh
    (`a3jax.sharding.activate`): batch over the batch axes, heads over the tensor axis when both head
    counts divide; otherwise XLA would replicate a kernel's custom call. Without a mesh, just fn."""
    specs = _shard_specs(q, k)
    if specs is None:
        return fn(q, k, v, q_groups, q_segments, k_groups, k_segments)
    mesh, xspec, idspec = specs
    return jax.shard_map(fn, mesh=mesh, in_specs=(xspec, xspec, xspec, idspec, idspec, idspec, idspec),
                         out_specs=xspec, check_vma=False)(q, k, v, q_groups, q_segments, k_groups, k_segments)


def pallas_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block_q: int = 128, block_k: int = 128):
    """The fused kernel; same arguments and result as `a3jax.model.attention.dense_attention`."""
    fn = functools.partial(_local_attention, block_q=block_q, block_k=block_k)
    return run_per_shard(fn, q, k, v, q_groups, q_segments, k_groups, k_segments)
