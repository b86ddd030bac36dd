"""`attention: pallas` (a3jax.model.pallas_attention): the fused TPU kernel, run on this CPU in Pallas
interpret mode, against the `dense` reference over drawn A3 layouts; its block skipping; and the same
kernel compiled for TPU (Mosaic, through libtpu on this host) with its cost estimate.

Interpret mode compiles slowly, so every layout shape below is fixed per case (one compile each) and
hypothesis draws the contents: ids, values and cotangents."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a3jax.config import ModelConfig
from a3jax.model.attention import choose_kernel
from a3jax.model.pallas_attention import (block_sizes, compile_target, kernel_ranges, pallas_attention,
                                          target_platform)
from attention_cases import CASES, check_bf16_as_accurate_as_dense, check_equals_dense_fp32, layouts, visible_blocks


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=8)
@given(data=st.data())
def test_pallas_equals_dense_fp32(case, data):
    check_equals_dense_fp32("pallas", case, data)


@settings(max_examples=5)
@given(data=st.data())
def test_pallas_bf16_is_as_accurate_as_dense_bf16(data):
    """bf16 inputs, fp32 accumulation. Both kernels round p to bf16 before the PV matmul (pallas after
    the running max, dense after the row max) and round the output to bf16: a few bf16 ulps (2^-8
    relative) at unit scale. The bar: pallas's error against an fp32 computation on the same rounded
    inputs is at most twice dense-bf16's own error plus 1e-3, and never above 3e-2."""
    check_bf16_as_accurate_as_dense("pallas", data)


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
    need = visible_blocks(ids, bq, bk)
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
        assert choose_kernel(cfg, 4096) == "pallas_gpu"
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
