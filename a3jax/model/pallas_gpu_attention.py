"""`attention: pallas_gpu`: a fused flash-attention kernel for GPUs (Pallas, Triton backend) with the A3 rule.

Same contract as the other kernels (a3jax.model.attention): q [B, Tq, H, D], k/v [B, Tk, Hkv, D], the
rows' attend-up-to group and segment ids, the keys' group and segment ids; a key is visible when the
segments match (non-zero) and key group <= row group (`masks.visible`). A row that sees no key gets
a zero output.

Why our own: cuDNN's fused attention takes causal/window/length masks or a dense T x T bias; JAX's
Pallas GPU flash attention takes causal masks and equal-segment ids; tokamax and fa4-jax express
other rules only as dense masks loaded tile by tile or as mask functions without per-example block
ranges. The A3 rule needs per-example groups compared by order, and block skipping from them.

* Block skipping: per example and query block, `masks.block_visibility` gives key blocks
  [lo, mid) that every row of the block sees (run without building a mask), [mid, hi) that need the
  exact mask, and skips the rest. With the sorted generation-order layout (groups contiguous, as
  the data pipeline and the decoder lay rows out) every hidden block is skipped and only the
  diagonal blocks are masked. The dK/dV kernel walks, per key block, the query blocks that see it:
  a masked part then a fully visible part (`key_block_ranges`).
* One program per (example, query head, query block) for the forward and dQ, per (example, query
  head, key block) for dK/dV: K/V are read through the query head's kv head (GQA without repeating
  K/V); dK/dV are accumulated per query head in fp32 and summed over each kv head's group outside.
* Memory linear in T: only the per-row lse (fp32) is kept for the backward; delta = rowsum(dO * O)
  is one XLA reduction.
* Triton wants power-of-two tiles of at least 16: row and key blocks are rounded to that, T is
  padded to the blocks with segment 0 (never visible, never seeing), D to a power of two with zeros.
* fp32 inputs follow JAX's matmul precision like XLA's own matmuls: TF32 products by default on
  Ampere and later, full fp32 under `jax_default_matmul_precision=highest` (then equal to `dense` to
  fp32 rounding, as the GPU tests run).
* JAX 0.11 deprecated Pallas' Triton backend in favour of Mosaic GPU (it warns when lowering); the
  requirements keep JAX below the release that would drop it.

Off a GPU the same kernel runs in Pallas interpret mode (slow: tests and checks). Under
`compile_target("gpu")` it lowers to Triton on any host (`a3jax compile --platform cuda`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from a3jax import masks
from a3jax.model.pallas_attention import pad_axis, round_up, run_per_shard, target_platform

NEG = -1e30          # score of a hidden key
EMPTY_LSE = 1e30     # lse of a row that sees nothing: exp(s - lse) == 0 in the backward
MIN_TILE = 16        # Triton's smallest dot operand side


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


class Tiles(NamedTuple):
    """(rows, keys) tile of each kernel: forward, dQ, dK/dV."""
    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]

    def rows_multiple(self) -> int:
        return max(self.fwd[0], self.dq[0], self.dkv[0])

    def keys_multiple(self) -> int:
        return max(self.fwd[1], self.dq[1], self.dkv[1])


def tile_sizes(tq: int, tk: int, block: int = 128, head_dim: int = 64) -> Tiles:
    """The tiles for Tq rows and Tk keys from the block size B (`model.attention_block_size`):
    forward B x B/2, dQ B x B/4, dK/dV B/4 x B (rows x keys): the shapes of Triton's tuned flash
    attention for H100 at B = 128, the long side where a tile's accumulator lives. dK/dV's two
    [keys, D] fp32 accumulators grow with D: above D = 64 its key side shrinks in proportion, which
    keeps it free of register spills (bench/gpu_kernel_resources.py). Each side is a power of two, at
    least 16 (Triton's smallest dot) and no larger than the rounded-up T."""
    fit = lambda side, t: max(MIN_TILE, min(_pow2(max(side, 1)), _pow2(t)))
    pair = lambda r, c: (fit(r, tq), fit(c, tk))
    dkv_keys = block * 64 // max(64, _pow2(head_dim))
    return Tiles(pair(block, block // 2), pair(block, block // 4), pair(block // 4, dkv_keys))


def key_block_ranges(lo, mid, hi, nk: int):
    """For the dK/dV kernel: per key block j (int32 [..., nk] each) the query blocks [qlo, qmid) to run
    masked and [qmid, qhi) that see the whole key block, from the per-query-block ranges lo, mid, hi
    [..., nq] (`kernel_ranges` at the dK/dV tiles). The masked part may hold query blocks that see nothing of j (a hole in a
    shuffled layout): exact masking makes that wasted work, never a wrong result."""
    nq = lo.shape[-1]
    j = jnp.arange(nk, dtype=jnp.int32)
    i = jnp.arange(nq, dtype=jnp.int32)[:, None]
    need = (lo[..., :, None] <= j) & (j < hi[..., :, None])   # [..., nq, nk]
    full = (lo[..., :, None] <= j) & (j < mid[..., :, None])
    qlo = jnp.where(need, i, nq).min(-2)
    qhi = jnp.maximum(jnp.where(need, i + 1, 0).max(-2), qlo)
    # The run of fully visible query blocks that ends at qhi - 1.
    ok = full | (i >= qhi[..., None, :])
    suffix = jnp.flip(jnp.cumprod(jnp.flip(ok, -2).astype(jnp.int32), axis=-2), -2)
    qmid = jnp.clip(nq - suffix.sum(-2), qlo, qhi)
    return qlo.astype(jnp.int32), qmid.astype(jnp.int32), qhi.astype(jnp.int32)


# ----------------------------------------------------------------------------- in-kernel helpers


def _dot(a, b, ta=False, tb=False):
    """a @ b with either operand transposed, fp32 accumulation."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(qg, qs, kg, ks):
    """[bq, bk] visibility of rows (ids [bq]) against keys (ids [bk]): masks.visible, strict=False."""
    qg, qs = qg[:, None], qs[:, None]
    return (qs == ks[None, :]) & (qs != 0) & (kg[None, :] <= qg)


def _params(kernel: str, d: int, itemsize: int):
    """Warps and pipeline stages per kernel: the fewest warps that keep each kernel free of register
    spills on H100 (sm_90) at the default tiles, as Triton's own compiler and ptxas build them
    (bench/gpu_kernel_resources.py): the bf16 forward fits 4 warps up to D = 64 (255 registers);
    dQ and dK/dV take 8 (about 130 and 170 registers at D = 64)."""
    warps = 4 if kernel == "fwd" and d * itemsize <= 128 else 8
    return pltriton.CompilerParams(num_warps=warps, num_stages=3)


def _interpret() -> bool:
    return target_platform() != "gpu"


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(lo_ref, mid_ref, hi_ref, q_ref, k_ref, v_ref, qg_ref, qs_ref, kg_ref, ks_ref, o_ref, lse_ref,
                *, scale, bk):
    i = pl.program_id(2)
    q = q_ref[...]
    qg, qs = qg_ref[...], qs_ref[...]

    def step(j, carry, masked):
        o, m, l = carry
        keys = pl.ds(j * bk, bk)
        s = _dot(q, k_ref[keys, :], tb=True) * scale
        if masked:
            mask = _mask(qg, qs, kg_ref[keys], ks_ref[keys])
            s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        if masked:  # a row that has seen nothing yet has m_new == NEG and exp(0) == 1
            p = jnp.where(mask, p, 0.0)
        v = v_ref[keys, :]
        return o * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, l * alpha + p.sum(-1)

    bq, d = q.shape
    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(lo_ref[i], mid_ref[i], functools.partial(step, masked=False), carry)
    o, m, l = lax.fori_loop(mid_ref[i], hi_ref[i], functools.partial(step, masked=True), carry)
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], o / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), EMPTY_LSE)


def _row_specs(bq, tk, d, g):
    """BlockSpecs on a grid (b, h, i) over query blocks: the query tile, all of its kv head's K/V,
    the rows' ids, all the keys' ids, the ranges of example b."""
    q = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
    kv = pl.BlockSpec((None, tk, None, d), lambda b, h, i: (b, 0, h // g, 0))
    rid = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    kid = pl.BlockSpec((None, tk), lambda b, h, i: (b, 0))
    row = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    return q, kv, rid, kid, row


def _fwd_call(q, k, v, qg, qs, kg, ks, tiles, scale):
    """Padded q [B, Tq, H, D], k/v [B, Tk, Hkv, D], ids [B, T] -> o like q and lse [B, H, Tq] (fp32)."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    bq, bk = tiles.fwd
    nq = tq // bq
    lo, mid, hi = kernel_ranges(qg, qs, kg, ks, bq, bk)
    qspec, kvspec, rid, kid, row = _row_specs(bq, tk, d, h // hkv)
    rng = pl.BlockSpec((None, nq), lambda b_, h_, i: (b_, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, bk=bk),
        grid=(b, h, nq),
        in_specs=[rng, rng, rng, qspec, kvspec, kvspec, rid, rid, kid, kid],
        out_specs=[qspec, row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        compiler_params=_params("fwd", d, q.dtype.itemsize),
        interpret=_interpret(),
        name="a3_attention_fwd",
    )(lo, mid, hi, q, k, v, qg, qs, kg, ks)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(lo_ref, mid_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qg_ref, qs_ref,
               kg_ref, ks_ref, dq_ref, *, scale, bk):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qg, qs = qg_ref[...], qs_ref[...]

    def step(j, dq, masked):
        keys = pl.ds(j * bk, bk)
        k = k_ref[keys, :]
        s = _dot(q, k, tb=True) * scale
        if masked:  # exp(NEG - lse) == 0, also for rows that see nothing (lse = EMPTY_LSE)
            s = jnp.where(_mask(qg, qs, kg_ref[keys], ks_ref[keys]), s, NEG)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v_ref[keys, :], tb=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(lo_ref[i], mid_ref[i], functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(mid_ref[i], hi_ref[i], functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qlo_ref, qmid_ref, qhi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qg_ref, qs_ref,
                kg_ref, ks_ref, dk_ref, dv_ref, *, scale, bq):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kg, ks = kg_ref[...], ks_ref[...]

    # Computed transposed ([keys, rows]), so every product has the key tile's long side as its M
    # dimension (Hopper's wgmma wants M >= 64) and only q and dO tiles are read transposed.
    def step(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        st = _dot(k, q, tb=True) * scale                                   # [bk, bq]
        if masked:
            st = jnp.where(_mask(qg_ref[rows], qs_ref[rows], kg, ks).T, st, NEG)
        pt = jnp.exp(st - lse_ref[rows][None, :])
        dv = dv + _dot(pt.astype(do.dtype), do)
        dst = pt * (_dot(v, do, tb=True) - delta_ref[rows][None, :])
        return dk + _dot(dst.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = lax.fori_loop(qlo_ref[j], qmid_ref[j], functools.partial(step, masked=True), (zeros, zeros))
    dk, dv = lax.fori_loop(qmid_ref[j], qhi_ref[j], functools.partial(step, masked=False), carry)
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _bwd_calls(q, k, v, qg, qs, kg, ks, o, lse, do, tiles, scale):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    interpret = _interpret()

    # dQ: grid (b, h, i) over query blocks, like the forward, with its own tiles and ranges.
    bq, bk = tiles.dq
    nq = tq // bq
    lo, mid, hi = kernel_ranges(qg, qs, kg, ks, bq, bk)
    qspec, kvspec, rid, kid, row = _row_specs(bq, tk, d, g)
    rng = pl.BlockSpec((None, nq), lambda b_, h_, i: (b_, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bk=bk),
        grid=(b, h, nq),
        in_specs=[rng, rng, rng, qspec, kvspec, kvspec, qspec, row, row, rid, rid, kid, kid],
        out_specs=qspec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params("dq", d, q.dtype.itemsize), interpret=interpret, name="a3_attention_dq",
    )(lo, mid, hi, q, k, v, do, lse, delta, qg, qs, kg, ks)

    # dK/dV: grid (b, h, j) over key blocks; each program walks the query blocks that see its block.
    bq, bk = tiles.dkv
    nk = tk // bk
    lo, mid, hi = kernel_ranges(qg, qs, kg, ks, bq, bk)
    qlo, qmid, qhi = key_block_ranges(lo, mid, hi, nk)
    qall = pl.BlockSpec((None, tq, None, d), lambda b_, h_, j: (b_, 0, h_, 0))
    ktile = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, h_ // g, 0))
    dkv = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, h_, 0))
    rall = pl.BlockSpec((None, None, tq), lambda b_, h_, j: (b_, h_, 0))
    ridall = pl.BlockSpec((None, tq), lambda b_, h_, j: (b_, 0))
    kidt = pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j))
    krng = pl.BlockSpec((None, nk), lambda b_, h_, j: (b_, 0))
    per_head = jax.ShapeDtypeStruct((b, tk, h, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq),
        grid=(b, h, nk),
        in_specs=[krng, krng, krng, qall, ktile, ktile, qall, rall, rall, ridall, ridall, kidt, kidt],
        out_specs=[dkv, dkv],
        out_shape=[per_head, per_head],
        compiler_params=_params("dkv", d, q.dtype.itemsize), interpret=interpret, name="a3_attention_dkv",
    )(qlo, qmid, qhi, q, k, v, do, lse, delta, qg, qs, kg, ks)
    group_sum = lambda x: x.reshape(b, tk, hkv, g, d).sum(3)  # query heads -> their kv head
    return dq, group_sum(dk).astype(k.dtype), group_sum(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fused(q, k, v, qg, qs, kg, ks, tiles, scale):
    return _fwd_call(q, k, v, qg, qs, kg, ks, tiles, scale)[0]


def _fused_fwd(q, k, v, qg, qs, kg, ks, tiles, scale):
    o, lse = _fwd_call(q, k, v, qg, qs, kg, ks, tiles, scale)
    return o, (q, k, v, qg, qs, kg, ks, o, lse)


def _fused_bwd(tiles, scale, res, do):
    q, k, v, qg, qs, kg, ks, o, lse = res
    dq, dk, dv = _bwd_calls(q, k, v, qg, qs, kg, ks, o, lse, do, tiles, scale)
    return dq, dk, dv, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- entry point


def kernel_ranges(q_groups, q_segments, k_groups, k_segments, bq: int, bk: int):
    """Per example and query block, the key blocks [lo, mid) run without a mask and [mid, hi) run
    masked: int32 [B, nq] each (`masks.block_visibility` of each example alone; ids padded)."""
    one = lambda a, c, e, f: masks.block_visibility(a[None], c[None], e[None], f[None], bq, bk)
    return jax.vmap(one)(q_groups, q_segments, k_groups, k_segments)


def _local_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"pallas_gpu attention: {h} query heads are not a multiple of {hkv} kv heads")
    tiles = tile_sizes(tq, tk, block, d)
    tqp, tkp = round_up(tq, tiles.rows_multiple()), round_up(tk, tiles.keys_multiple())
    dp = max(MIN_TILE, _pow2(d))
    i32 = lambda x: x.astype(jnp.int32)
    qg, qs = pad_axis(i32(q_groups), tqp, 1), pad_axis(i32(q_segments), tqp, 1)
    kg, ks = pad_axis(i32(k_groups), tkp, 1), pad_axis(i32(k_segments), tkp, 1)
    pad = lambda x, t: pad_axis(pad_axis(x, t, 1), dp, 3)
    o = _fused(pad(q, tqp), pad(k, tkp), pad(v, tkp), qg, qs, kg, ks, tiles, d ** -0.5)
    return o[:, :tq, :, :d]


def pallas_gpu_attention(q, k, v, q_groups, q_segments, k_groups, k_segments, block: int = 128):
    """The fused GPU kernel; same arguments and result as `a3jax.model.attention.dense_attention`.
    `block`: the tile scale (see `tile_sizes`)."""
    fn = functools.partial(_local_attention, block=block)
    return run_per_shard(fn, q, k, v, q_groups, q_segments, k_groups, k_segments)
