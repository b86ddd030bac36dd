"""Shared by the fused-kernel tests (tests/test_pallas_attention.py for TPU, tests/test_pallas_gpu_attention.py
for GPU): drawn A3 layouts, the fixed shapes (one interpret-mode compile each), and one jitted
forward+backward per kernel to compare against `dense`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from a3jax import masks
from a3jax.config import MeshConfig
from a3jax.model.attention import attention
from a3jax.sharding import activate, make_mesh, rules_of


@st.composite
def layouts(draw, b, tq, tk):
    """Rows' attend-up-to groups and segments, keys' groups and segments, as numpy int32 [b, t].

    Self-attention (tq == tk) draws one A3 layout per example: generation-order groups, sorted or
    shuffled, with ties; packed segments; tail padding; optionally an empty first group; the content
    or the query stream. Otherwise (decoding) rows and cache keys are drawn independently."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    shuffle = draw(st.booleans())
    tie = draw(st.sampled_from([0.0, 0.5, 0.9]))
    n_seg = draw(st.integers(1, 3))
    pad = draw(st.integers(0, max(tk // 3, 1)))
    empty_first = draw(st.booleans())
    stream = draw(st.sampled_from([masks.CONTENT, masks.QUERY]))

    def one(t, pad_t):
        real = t - min(pad_t, t - 1)
        cuts = np.sort(rng.choice(np.arange(1, real), size=min(n_seg - 1, real - 1), replace=False)) if real > 1 else []
        seg = np.zeros(t, np.int32)
        seg[:real] = 1 + np.searchsorted(cuts, np.arange(real), side="right")
        grp = np.zeros(t, np.int32)
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            steps = (rng.random(len(idx)) >= tie).astype(np.int32)
            g = np.cumsum(steps) - steps[0] + int(empty_first)
            grp[idx] = rng.permutation(g) if shuffle else g
        return grp, seg

    if tq == tk:
        kg, ks = map(np.stack, zip(*[one(tk, pad) for _ in range(b)]))
        return masks.stream_groups(kg, stream), ks, kg, ks
    kg, ks = map(np.stack, zip(*[one(tk, pad) for _ in range(b)]))
    # Decoding rows: ids drawn from the cache's range, some rows padding or in a fresh segment.
    qg = rng.integers(-1, int(kg.max()) + 2, (b, tq)).astype(np.int32)
    qs = rng.integers(0, int(ks.max()) + 2, (b, tq)).astype(np.int32)
    return qg, qs, kg, ks


# (batch, rows, keys, heads, kv heads, head dim, block): GQA ratios 3, 4 and 1; rows and keys not a
# multiple of the block; several query and key blocks; a decoding step (6 rows, 260 cached keys).
# SHARDED cases run inside `activate(mesh)` as the train step does: the kernel then runs per shard
# (shard_map), the batch split over fsdp = 2.
SHARDED = {"gqa4_oneblock"}
CASES = {
    "gqa3_multiblock": (2, 200, 200, 3, 1, 8, 64),
    "gqa4_oneblock": (2, 77, 77, 8, 2, 16, 128),
    "gqa1_decode": (2, 6, 260, 2, 2, 8, 128),
}


def values(case, seed, dtype):
    b, tq, tk, h, hkv, d, _ = CASES[case]
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
    return mk(b, tq, h, d), mk(b, tk, hkv, d), mk(b, tk, hkv, d), mk(b, tq, h, d).astype(jnp.float32)


@functools.cache
def fwd_bwd(kind, block):
    """jit of (out, dq, dk, dv) of sum(out * cot) for one kernel (cached: one compile per shape)."""
    def step(q, k, v, cot, qg, qs, kg, ks):
        fn = lambda q, k, v: attention(kind, q, k, v, qg, qs, kg, ks, block)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cot.astype(out.dtype)))
    return jax.jit(step)


def run_kernel(kind, case, dtype, seed, ids, ref_dtype=None):
    q, k, v, cot = values(case, seed, dtype)
    if ref_dtype is not None:  # the same (rounded) inputs, computed in ref_dtype
        q, k, v = (x.astype(ref_dtype) for x in (q, k, v))
    fn = fwd_bwd(kind, CASES[case][-1])
    args = (q, k, v, cot, *map(jnp.asarray, ids))
    if case in SHARDED:
        mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=1)
        with activate(make_mesh(mesh_cfg, devices=jax.devices()[:2]), rules_of(mesh_cfg)):
            if kind != "dense":
                assert "sdy.manual_computation" in fn.lower(*args).as_text()  # shard_map: runs per shard
            out = fn(*args)
    else:
        out = fn(*args)
    return [np.asarray(x, np.float32) for x in out]


def check_equals_dense_fp32(kind, case, data):
    """fp32 values and gradients of `kind` equal dense's on a drawn layout; a row that sees no key
    outputs exactly zero (and passes no gradient)."""
    b, tq, tk = CASES[case][:3]
    ids = data.draw(layouts(b, tq, tk))
    seed = data.draw(st.integers(0, 1000))
    got = run_kernel(kind, case, jnp.float32, seed, ids)
    want = run_kernel("dense", case, jnp.float32, seed, ids)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    blind = ~np.asarray(masks.visible(*ids, strict=False)).any(-1)  # [b, tq]
    assert (got[0][blind] == 0).all() and (got[1][blind] == 0).all()


def check_bf16_as_accurate_as_dense(kind, data, case="gqa3_multiblock"):
    """bf16 inputs, fp32 accumulation: `kind`'s error against an fp32 computation on the same rounded
    inputs is at most twice dense-bf16's own error plus 1e-3, and never above 3e-2."""
    b, tq, tk = CASES[case][:3]
    ids = data.draw(layouts(b, tq, tk))
    exact = run_kernel("dense", case, jnp.bfloat16, 0, ids, ref_dtype=jnp.float32)
    got = run_kernel(kind, case, jnp.bfloat16, 0, ids)
    dense = run_kernel("dense", case, jnp.bfloat16, 0, ids)
    for name, g, dn, x in zip(("out", "dq", "dk", "dv"), got, dense, exact):
        scale = max(1.0, float(np.abs(x).max()))
        err_k, err_d = np.abs(g - x).max() / scale, np.abs(dn - x).max() / scale
        assert err_k <= 2 * err_d + 1e-3 and err_k < 3e-2, (name, err_k, err_d)


def _block_pairs(ids, bq, bk):
    """The visibility of layout `ids` padded to the blocks (padding hidden): [b, nq, bq, nk, bk]."""
    vis = np.asarray(masks.visible(*ids, strict=False))
    b, tq, tk = vis.shape
    vis = np.pad(vis, ((0, 0), (0, -tq % bq), (0, -tk % bk)))
    return vis.reshape(b, vis.shape[1] // bq, bq, vis.shape[2] // bk, bk)


def visible_blocks(ids, bq, bk):
    """[b, nq, nk]: does the (query block, key block) pair hold a visible key?"""
    return _block_pairs(ids, bq, bk).any((2, 4))


def full_blocks(ids, bq, bk):
    """[b, nq, nk]: is every (row, key) pair of the block pair visible (rows and keys all real)?"""
    return _block_pairs(ids, bq, bk).all((2, 4))
