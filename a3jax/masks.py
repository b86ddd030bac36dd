"""The A3 visibility rule, defined once. Every attention kernel, the decoder and the scorer use it.

Per row: groups[T] (generation order, smaller = earlier) and segment_ids[T] (0 = padding).

    content i sees j  <=>  seg[i] == seg[j] != 0  and  groups[j] <= groups[i]
    query   i sees j  <=>  seg[i] == seg[j] != 0  and  groups[j] <  groups[i]

Because group ids are integers, "groups[j] < groups[i]" is "groups[j] <= groups[i] - 1": the query
stream is the content rule applied with the row's group id lowered by one. Kernels therefore take a
single per-row "attend-up-to" group id (`query_groups`) and implement only `visible(..., strict=False)`;
`stream_groups` produces that id for either stream. Tests check both forms agree.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CONTENT = "content"
QUERY = "query"


def visible(q_groups, q_segments, k_groups, k_segments, *, strict: bool):
    """Boolean [..., Tq, Tk]: may a row (q) attend to a key (k)? Works on numpy and jax arrays."""
    xp = jnp if any(not isinstance(a, np.ndarray) for a in (q_groups, k_groups)) else np
    qg, qs = q_groups[..., :, None], q_segments[..., :, None]
    kg, ks = k_groups[..., None, :], k_segments[..., None, :]
    order = (kg < qg) if strict else (kg <= qg)
    return xp.logical_and(xp.logical_and(qs == ks, qs != 0), order)


def content_mask(groups, segment_ids):
    """[..., T, T] content-stream mask of a row against itself."""
    return visible(groups, segment_ids, groups, segment_ids, strict=False)


def query_mask(groups, segment_ids):
    """[..., T, T] query-stream mask of a row against itself."""
    return visible(groups, segment_ids, groups, segment_ids, strict=True)


def stream_groups(groups, stream: str):
    """The non-strict "attend-up-to" group id of each row for `stream` (see module docstring)."""
    if stream == CONTENT:
        return groups
    if stream == QUERY:
        return groups - 1
    raise ValueError(f"stream must be 'content' or 'query', got {stream!r}")


def block_ranges(q_groups, q_segments, k_groups, k_segments, block_q: int, block_k: int):
    """Per query block, the [lo, hi) range of key blocks that may hold a visible key (any batch row).

    A key block is needed by a query block when, for some batch row, their segment ranges overlap
    and the key block's smallest group is <= the query block's largest attend-up-to group. This is
    conservative (exact masking still runs inside the range); with the sorted generation-order layout
    the needed blocks are contiguous and the range skips everything the rule hides. Padding keys
    (segment 0) never count. Returns int32 arrays lo[nq], hi[nq] (hi == lo when nothing is visible).
    """
    lo, _, hi = block_visibility(q_groups, q_segments, k_groups, k_segments, block_q, block_k)
    return lo, hi


def block_visibility(q_groups, q_segments, k_groups, k_segments, block_q: int, block_k: int):
    """`block_ranges` plus where its fully visible prefix ends: int32 lo, mid, hi [nq] with
    lo <= mid <= hi, such that every key block in [lo, mid) is visible to every row of the query
    block in every batch row (one real segment shared by all its rows and keys, every key's group
    <= every row's attend-up-to group), so a kernel may skip the mask there. With the sorted
    generation-order layout only the diagonal blocks are left in [mid, hi)."""
    big = jnp.iinfo(jnp.int32).max

    def stats(g, s, blk):
        b, t = g.shape
        g, s = g.reshape(b, t // blk, blk), s.reshape(b, t // blk, blk)
        real = s != 0
        gmin = jnp.where(real, g, big).min(-1)
        gmax = jnp.where(real, g, -big).max(-1)
        smin = jnp.where(real, s, big).min(-1)
        smax = jnp.where(real, s, -big).max(-1)
        return gmin, gmax, smin, smax, real.all(-1)

    qgmin, qgmax, qsmin, qsmax, qreal = stats(q_groups, q_segments, block_q)
    kgmin, kgmax, ksmin, ksmax, kreal = stats(k_groups, k_segments, block_k)
    need = ((kgmin[:, None, :] <= qgmax[:, :, None])
            & (ksmin[:, None, :] <= qsmax[:, :, None])
            & (ksmax[:, None, :] >= qsmin[:, :, None])).any(0)  # [nq, nk]
    one_seg = lambda smin, smax, real: real & (smin == smax)
    full = (one_seg(qsmin, qsmax, qreal)[:, :, None] & one_seg(ksmin, ksmax, kreal)[:, None, :]
            & (qsmin[:, :, None] == ksmin[:, None, :])
            & (kgmax[:, None, :] <= qgmin[:, :, None])).all(0)  # [nq, nk]
    nk = need.shape[1]
    idx = jnp.arange(nk, dtype=jnp.int32)
    lo = jnp.where(need, idx, nk).min(-1)
    hi = jnp.where(need, idx + 1, 0).max(-1)
    hi = jnp.maximum(hi, lo)
    # mid: the end of the run of full blocks that starts at lo.
    run = jnp.cumprod(jnp.where(idx[None, :] >= lo[:, None], full, True).astype(jnp.int32), axis=1)
    mid = jnp.clip(run.sum(-1), lo, hi)
    return lo.astype(jnp.int32), mid.astype(jnp.int32), hi.astype(jnp.int32)
