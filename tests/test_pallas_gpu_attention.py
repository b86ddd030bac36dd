"""`attention: pallas_gpu` (a3jax.model.pallas_gpu_attention): the fused GPU kernel (Pallas, Triton
backend), run on this CPU in Pallas interpret mode, against the `dense` reference over drawn A3
layouts (values and gradients; GQA, padding, segments, T not a multiple of the tile, decoding
shapes, a head dim that is not a power of two); the block ranges its backward walks; and `auto`
choosing it on a GPU. The same kernel lowered to Triton for CUDA is in tests/test_compile_gpu.py.

On a GPU host (`bench/device_check.sh`) this file runs the kernel compiled, not interpreted."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a3jax.config import ConfigError, ModelConfig
from a3jax.model.attention import choose_kernel
from a3jax.model.pallas_attention import compile_target
from a3jax.model.pallas_gpu_attention import kernel_ranges, key_block_ranges, tile_sizes
from attention_cases import (CASES, check_bf16_as_accurate_as_dense, check_equals_dense_fp32, full_blocks, layouts,
                             visible_blocks)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=6)
@given(data=st.data())
def test_pallas_gpu_equals_dense_fp32(case, data):
    check_equals_dense_fp32("pallas_gpu", case, data)


@settings(max_examples=4)
@given(data=st.data())
def test_pallas_gpu_bf16_is_as_accurate_as_dense_bf16(data):
    """bf16 inputs, fp32 accumulation (the bar of the TPU kernel's test): the kernel's error against
    an fp32 computation on the same rounded inputs is at most twice dense-bf16's plus 1e-3."""
    check_bf16_as_accurate_as_dense("pallas_gpu", data)


def test_tile_sizes_are_powers_of_two_of_at_least_16():
    t = tile_sizes(2048, 2048, 128)
    assert (t.fwd, t.dq, t.dkv) == ((128, 64), (128, 32), (32, 128))
    assert (t.rows_multiple(), t.keys_multiple()) == (128, 128)
    assert tile_sizes(2048, 2048, 128, head_dim=128).dkv == (32, 64)  # two [keys, 128] accumulators
    t = tile_sizes(6, 260, 128)                  # a decoding step: 6 rows in 16-row tiles
    assert (t.fwd, t.dq, t.dkv) == ((16, 64), (16, 32), (16, 128))
    t = tile_sizes(77, 77, 128)                  # one row tile, rounded up from 77
    assert t.fwd == (128, 64) and t.dkv == (32, 128)
    assert tile_sizes(100, 100, 48).fwd == (64, 32)  # a block that is not a power of two


_ranges = jax.jit(kernel_ranges, static_argnums=(4, 5))
_key_ranges = jax.jit(key_block_ranges, static_argnums=3)


@settings(max_examples=20)
@given(data=st.data(), t=st.sampled_from([1, 100, 130, 300]), sort=st.booleans())
def test_block_ranges_of_both_passes_cover_every_visible_pair(data, t, sort):
    """The forward/dQ ranges (per query block) and the dK/dV ranges (per key block) each visit every
    block pair holding a visible key; whatever either runs unmasked is fully visible; with the sorted
    layout of one segment, both visit exactly the needed pairs."""
    ids = data.draw(layouts(2, t, t))
    if sort:  # the generation-order layout: positions sorted by (segment, group), padding last
        order = np.lexsort((ids[2], np.where(ids[3] == 0, 1 << 20, ids[3])), axis=-1)
        ids = [np.take_along_axis(x, order, -1) for x in ids]
    tiles = tile_sizes(t, t, 64)
    pad = lambda x, m: np.pad(x, ((0, 0), (0, -t % m)))
    one_sorted_segment = sort and all(len(np.unique(s[s > 0])) <= 1 for s in ids[3])
    for bq, bk, per_key_block in (tiles.fwd + (False,), tiles.dkv + (True,)):
        lo, mid, hi = _ranges(pad(ids[0], bq), pad(ids[1], bq), pad(ids[2], bk), pad(ids[3], bk), bq, bk)
        nq, nk = -(-t // bq), -(-t // bk)
        if per_key_block:  # the dK/dV kernel's walk, turned back into [b, nq, nk]
            qlo, qmid, qhi = map(np.asarray, _key_ranges(lo, mid, hi, nk))
            i = np.arange(nq)
            visit = np.swapaxes((qlo[..., None] <= i) & (i < qhi[..., None]), 1, 2)
            unmasked = np.swapaxes((qmid[..., None] <= i) & (i < qhi[..., None]), 1, 2)
        else:
            lo, mid, hi = map(np.asarray, (lo, mid, hi))
            j = np.arange(nk)
            visit = (lo[..., None] <= j) & (j < hi[..., None])
            unmasked = (lo[..., None] <= j) & (j < mid[..., None])
        need, full = visible_blocks(ids, bq, bk), full_blocks(ids, bq, bk)
        assert not (need & ~visit).any()        # never skips a block pair with a visible key
        assert not (unmasked & ~full).any()     # never drops the mask where a pair is hidden
        if one_sorted_segment:
            assert (visit == need).all()


def test_auto_picks_pallas_gpu_when_tracing_for_gpu_and_configs_accept_it():
    cfg = ModelConfig(attention="auto")
    with compile_target("gpu"):
        assert choose_kernel(cfg, 4096) == "pallas_gpu"
        assert choose_kernel(cfg, 4096, step_rows=8) == "pallas_gpu"  # cached decoding steps too
        assert choose_kernel(ModelConfig(attention="dense"), 4096) == "dense"
    with compile_target("cpu"):
        assert choose_kernel(cfg, 4096) == "blockwise"
    ModelConfig(attention="pallas_gpu").validate()
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig(attention="triton").validate()
