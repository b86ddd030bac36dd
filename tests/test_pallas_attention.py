"""`attention: pallas` (a3jax.model.pallas_attention): the fused TPU kernel, run on this CPU in Pallas
interpret mode, against the `dense` reference over drawn A3 layouts; its block skipping; and the same
kernel compiled for TPU (Mosaic, through libtpu on this host) with its cost estimate.

Interpret mode compiles slowly, so every layout shape below is fixed per case (one compile each) and
hypothesis draws the contents: ids, values and cotangents."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a3jax import masks
from a3jax.config import MeshConfig, ModelConfig
from a3jax.model.attention import choose_kernel, dense_attention
from a3jax.model.pallas_attention import (block_sizes, compile_target, kernel_ranges, pallas_attention,
                                          target_platform)
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


def _values(case, seed, dtype):
    b, tq, tk, h, hkv, d, _ = CASES[case]
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
    return mk(b, tq, h, d), mk(b, tk, hkv, d), mk(b, tk, hkv, d), mk(b, tq, h, d).astype(jnp.float32)


@functools.cache
def _fwd_bwd(kind, block):
    """jit of (out, dq, dk, dv) of sum(out * cot) for one kernel (cached: one compile per shape)."""
    def run(q, k, v, cot, qg, qs, kg, ks):
        if kind == "pallas":
            fn = lambda q, k, v: pallas_attention(q, k, v, qg, qs, kg, ks, block, block)
        else:
            fn = lambda q, k, v: dense_attention(q, k, v, qg, qs, kg, ks)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cot.astype(out.dtype)))
    return jax.jit(run)


def _run(kind, case, dtype, seed, ids, ref_dtype=None):
    q, k, v, cot = _values(case, seed, dtype)
    if ref_dtype is not None:  # the same (rounded) inputs, computed in ref_dtype
        q, k, v = (x.astype(ref_dtype) for x in (q, k, v))
    fn = _fwd_bwd(kind, CASES[case][-1])
    args = (q, k, v, cot, *map(jnp.asarray, ids))
    if case in SHARDED:
        mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=1)
        with activate(make_mesh(mesh_cfg, devices=jax.devices()[:2]), rules_of(mesh_cfg)):
            if kind == "pallas":
                assert "sdy.manual_computation" in fn.lower(*args).as_text()  # shard_map: runs per shard
            out = fn(*args)
    else:
        out = fn(*args)
    return [np.asarray(x, np.float32) for x in out]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=8)
@given(data=st.data())
def test_pallas_equals_dense_fp32(case, data):
    b, tq, tk = CASES[case][:3]
    ids = data.draw(layouts(b, tq, tk))
    seed = data.draw(st.integers(0, 1000))
    got = _run("pallas", case, jnp.float32, seed, ids)
    want = _run("dense", case, jnp.float32, seed, ids)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    # A row that sees no key outputs exactly zero (and passes no gradient).
    blind = ~np.asarray(masks.visible(*ids, strict=False)).any(-1)  # [b, tq]
    assert (got[0][blind] == 0).all() and (got[1][blind] == 0).all()


@settings(max_examples=5)
@given(data=st.data())
def test_pallas_bf16_is_as_accurate_as_dense_bf16(data):
    """bf16 inputs, fp32 accumulation. Both kernels round p to bf16 before the PV matmul (pallas after
    the running max, dense after the row max) and round the output to bf16: a few bf16 ulps (2^-8
    relative) at unit scale. The bar: pallas's error against an fp32 computation on the same rounded
    inputs is at most twice dense-bf16's own error plus 1e-3, and never above 3e-2."""
    case = "gqa3_multiblock"
    b, tq, tk = CASES[case][:3]
    ids = data.draw(layouts(b, tq, tk))
    exact = _run("dense", case, jnp.bfloat16, 0, ids, ref_dtype=jnp.float32)
    got = _run("pallas", case, jnp.bfloat16, 0, ids)
    dense = _run("dense", case, jnp.bfloat16, 0, ids)
    for name, g, dn, x in zip(("out", "dq", "dk", "dv"), got, dense, exact):
        scale = max(1.0, float(np.abs(x).max()))
        err_p, err_d = np.abs(g - x).max() / scale, np.abs(dn - x).max() / scale
        assert err_p <= 2 * err_d + 1e-3 and err_p < 3e-2, (name, err_p, err_d)


def _visible_blocks(ids, bq, bk):
    """[b, nq, nk]: does the (query block, key block) pair hold a visible key?"""
    vis = np.asarray(masks.visible(*ids, strict=False))
    b, tq, tk = vis.shape
    vis = np.pad(vis, ((0, 0), (0, -tq % bq), (0, -tk % bk)))
    return vis.reshape(b, vis.shape[1] // bq, bq, vis.shape[2] // bk, bk).any((2, 4))


_ranges = jax.jit(kernel_ranges, static_argnums=(4, 5))


@settings(max_examples=20)
@given(data=st.data(), t=st.sampled_from([1, 100, 129, 700]), sort=st.booleans())
def test_block_skipping_visits_exactly_the_visible_blocks_when_sorted(data, t, sort):
    ids = data.draw(layouts(2, t, t))
    if sort:  # the generation-order layout: positions sorted by (segment, group), padding last
        order = np.lexsort((ids[2], np.where(ids[3] == 0, 1 << 20, ids[3])), axis=-1)
        ids = [np.take_along_axis(x, order, -1) for x in ids]
    bq, bk = block_sizes(t, t, 64, 128)
    pad = lambda x, m: np.pad(x, ((0, 0), (0, -t % m)))
    lo, hi = map(np.asarray, _ranges(pad(ids[0], bq), pad(ids[1], bq), pad(ids[2], bk), pad(ids[3], bk), bq, bk))
    j = np.arange(-(-t // bk))
    visited = (lo[..., None] <= j) & (j < hi[..., None])
    need = _visible_blocks(ids, bq, bk)
    assert not (need & ~visited).any()  # never skips a block with a visible key
    if sort:
        # Within one segment the sorted layout is causal-like: the range is exactly the needed blocks.
        if all(len(np.unique(s[s > 0])) <= 1 for s in ids[3]):
            assert (visited == need).all()


def test_auto_picks_pallas_when_tracing_for_tpu():
    cfg = ModelConfig(attention="auto")
    assert target_platform() == "cpu"
    with compile_target("tpu"):
        assert target_platform() == "tpu"
        assert choose_kernel(cfg, 4096) == "pallas"
        assert choose_kernel(cfg, 4096, step_rows=8) == "pallas"  # cached decoding steps too
        assert choose_kernel(ModelConfig(attention="blockwise"), 4096) == "blockwise"
    with compile_target("gpu"):
        assert choose_kernel(cfg, 4096) == "blockwise"
    assert choose_kernel(cfg, 4096) != "pallas"


@pytest.mark.usefixtures("tpu_compiler_env")  # loads libtpu
def test_pallas_compiles_for_tpu_with_its_cost_estimate():
    """Mosaic compiles the kernels for a v5e chip on this host; XLA's cost analysis counts the kernels'
    own estimates: forward 4, dq 6, dk/dv 8 x B*H*Tq*Tk*D FLOPs over the padded grid."""
    from a3jax.compile import topology_devices  # deferred: loads libtpu

    dev = topology_devices("v5e:2x2")[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    b, t, h, hkv, d = 1, 1000, 4, 2, 128
    a = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    loss = lambda q, k, v, g, s: pallas_attention(q, k, v, g, s, g, s).astype(jnp.float32).sum()
    args = (a((b, t, h, d)), a((b, t, hkv, d)), a((b, t, hkv, d)), a((b, t), jnp.int32), a((b, t), jnp.int32))
    with compile_target("tpu"):
        fwd = jax.jit(loss).lower(*args)
        both = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args)
    assert "tpu_custom_call" in both.as_text()
    tp = 1024  # 1000 padded to the 128 block
    unit = b * h * tp * tp * d
    f_fwd = fwd.compile().cost_analysis()["flops"]
    f_both = both.compile().cost_analysis()["flops"]
    assert 4 * unit <= f_fwd <= 4 * unit * 1.01
    assert 18 * unit <= f_both <= 18 * unit * 1.01
