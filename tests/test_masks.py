"""The visibility rule: its two forms agree, and the block skipping never hides a visible key."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from a3jax import masks


# jitted: one compile per shape and block sizes, where eager calls compile every op for every new shape
block_ranges = jax.jit(masks.block_ranges, static_argnums=(4, 5))
block_visibility = jax.jit(masks.block_visibility, static_argnums=(4, 5))


@st.composite
def ids(draw):
    t = draw(st.integers(1, 40))
    groups = np.array(draw(st.lists(st.integers(-3, 10), min_size=t, max_size=t)), np.int32)[None]
    segs = np.array(draw(st.lists(st.integers(0, 3), min_size=t, max_size=t)), np.int32)[None]
    return groups, segs


@given(ids())
def test_rule_as_written(x):
    g, s = x
    c, q = masks.content_mask(g, s)[0], masks.query_mask(g, s)[0]
    t = g.shape[1]
    for i in range(t):
        for j in range(t):
            same = s[0, i] == s[0, j] != 0
            assert c[i, j] == (same and g[0, j] <= g[0, i])
            assert q[i, j] == (same and g[0, j] < g[0, i])


@given(ids())
def test_query_stream_is_content_rule_on_lowered_groups(x):
    g, s = x
    strict = masks.visible(g, s, g, s, strict=True)
    lowered = masks.visible(masks.stream_groups(g, masks.QUERY), s, g, s, strict=False)
    np.testing.assert_array_equal(strict, lowered)
    np.testing.assert_array_equal(masks.visible(masks.stream_groups(g, masks.CONTENT), s, g, s, strict=False),
                                  masks.content_mask(g, s))


@given(ids(), ids(), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 3, 8]), st.booleans())
def test_block_ranges_cover_every_visible_pair(qx, kx, bq, bk, sort):
    qg, qs = qx
    kg, ks = kx
    if sort:  # the generation-order layout
        o = np.lexsort((kg[0], ks[0]))
        kg, ks = kg[:, o], ks[:, o]
    pad = lambda a, m: np.pad(a, ((0, 0), (0, (-a.shape[1]) % m)))
    qg, qs, kg, ks = pad(qg, bq), pad(qs, bq), pad(kg, bk), pad(ks, bk)
    vis = np.asarray(masks.visible(qg, qs, kg, ks, strict=False))[0]
    lo, hi = (np.asarray(a) for a in block_ranges(qg, qs, kg, ks, bq, bk))
    for i, j in zip(*np.nonzero(vis)):
        assert lo[i // bq] <= j // bk < hi[i // bq]


def test_rule_rejects_unknown_stream():
    with pytest.raises(ValueError, match="stream must be"):
        masks.stream_groups(np.zeros(3), "both")


@settings(max_examples=30, deadline=None)  # many shapes: each example may compile
@given(ids(), ids(), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 3, 8]), st.booleans(), st.booleans())
def test_block_visibility_full_prefix_is_fully_visible(qx, kx, bq, bk, sort, one_segment):
    """[lo, mid) blocks (where the kernel skips the mask) hold only visible pairs, in every batch row;
    [lo, hi) is block_ranges' range. The sorted, single-segment case is the training layout."""
    qg, qs = qx
    kg, ks = kx
    if one_segment:
        qs, ks = np.ones_like(qs), np.ones_like(ks)
    if sort:
        qg, kg = np.sort(qg, axis=1), np.sort(kg, axis=1)
    # Two batch rows: the second with the groups shifted, so "full" has to hold in both.
    qg, qs, kg, ks = (np.concatenate([a, a + (1 if a is qg else 0)]) for a in (qg, qs, kg, ks))
    pad = lambda a, m: np.pad(a, ((0, 0), (0, (-a.shape[1]) % m)))
    qg, qs, kg, ks = pad(qg, bq), pad(qs, bq), pad(kg, bk), pad(ks, bk)
    vis = np.asarray(masks.visible(qg, qs, kg, ks, strict=False))
    lo, mid, hi = (np.asarray(a) for a in block_visibility(qg, qs, kg, ks, bq, bk))
    lo2, hi2 = (np.asarray(a) for a in block_ranges(qg, qs, kg, ks, bq, bk))
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)
    assert (lo <= mid).all() and (mid <= hi).all()
    for i in range(len(lo)):
        for j in range(lo[i], mid[i]):
            assert vis[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].all()


def test_block_visibility_sorted_layout_masks_only_the_diagonal():
    t, blk = 64, 8
    g = np.broadcast_to(np.arange(t, dtype=np.int32) // 4, (2, t))
    s = np.ones_like(g)
    lo, mid, hi = (np.asarray(a) for a in masks.block_visibility(g, s, g, s, blk, blk))
    np.testing.assert_array_equal(lo, 0)
    np.testing.assert_array_equal(mid, np.arange(t // blk))  # blocks left of the diagonal: no mask
    np.testing.assert_array_equal(hi, np.arange(t // blk) + 1)
