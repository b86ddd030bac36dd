"""Invariant checks of the batch layout (used by the tests; cheap enough for a first-batch sanity check).

`check_batch(batch, ...)` raises `LayoutError` naming the row and the broken rule; it returns, for each
row, a list of segments, each a dict with `positions` (sorted-layout order), `groups` (ids relative to
the segment's first group) and `tokens` in original position order, so callers can check what a
strategy promised.
"""
from __future__ import annotations

import numpy as np

from a3jax.layout import LAYOUT_KEYS, token_range_error


class LayoutError(ValueError):
    """A batch that breaks the row layout (a3jax.layout); the message names the row and the rule."""


def check_batch(batch: dict, vocab_size: int, pad_id: int, bos_id: int, anchor_bos: bool = True) -> list:
    for k in LAYOUT_KEYS:
        if k not in batch:
            raise LayoutError(f"batch has no {k!r} (keys: {sorted(batch)})")
        a = np.asarray(batch[k])
        if a.ndim != 2 or a.shape != np.asarray(batch["tokens"]).shape:
            raise LayoutError(f"{k} has shape {a.shape}, tokens {np.asarray(batch['tokens']).shape}")
        if k != "loss_mask" and a.dtype != np.int32:
            raise LayoutError(f"{k} has dtype {a.dtype}, expected int32")
    return [check_row({k: np.asarray(batch[k])[r] for k in LAYOUT_KEYS}, vocab_size, pad_id, bos_id,
                      anchor_bos, where=f"row {r}") for r in range(np.asarray(batch["tokens"]).shape[0])]


def check_row(row: dict, vocab_size: int, pad_id: int, bos_id: int, anchor_bos: bool = True,
              where: str = "row") -> list:
    tok, pos, grp, seg, loss = (np.asarray(row[k]) for k in LAYOUT_KEYS)

    def fail(msg):
        raise LayoutError(f"{where}: {msg}")

    if msg := token_range_error(tok, vocab_size):
        fail(msg)
    if np.any(np.diff(grp) < 0):
        fail("groups are not non-decreasing")
    real = seg != 0
    n_real = int(real.sum())
    if not np.all(real[:n_real]) or np.any(real[n_real:]):
        fail("padding (segment 0) is not all at the end")
    if np.any(np.diff(seg[:n_real]) < 0):
        fail("segments are not sorted")
    pad = ~real
    if np.any(tok[pad] != pad_id) or np.any(pos[pad] != 0) or np.any(loss[pad] != 0):
        fail("padding must have token=pad, position=0, loss_mask=0")
    last = int(grp[:n_real].max()) + 1 if n_real else 0
    if np.any(grp[pad] != last):
        fail(f"padding group must be last real group + 1 = {last}")
    if n_real and grp[0] != 0:
        fail(f"first group id is {grp[0]}, expected 0")
    segments = []
    prev_max = -1
    for s in np.unique(seg[real]):
        idx = np.flatnonzero(seg == s)
        if np.any(np.diff(idx) != 1):
            fail(f"segment {s} is not contiguous")
        p, g, t = pos[idx], grp[idx], tok[idx]
        n = len(idx)
        if not np.array_equal(np.sort(p), np.arange(n)):
            fail(f"segment {s}: positions are not a permutation of 0..{n - 1}")
        if g.min() != prev_max + 1:
            fail(f"segment {s}: groups start at {g.min()}, expected {prev_max + 1} (overlap or gap)")
        if not np.array_equal(np.unique(g), np.arange(g.min(), g.max() + 1)):
            fail(f"segment {s}: group ids are not dense")
        prev_max = int(g.max())
        by_pos = np.argsort(p)
        if t[by_pos][0] != bos_id:
            fail(f"segment {s}: position 0 holds {t[by_pos][0]}, not BOS {bos_id}")
        if np.any(t[by_pos][1:] == bos_id):
            fail(f"segment {s}: BOS inside the segment (documents mixed?)")
        if anchor_bos and (p[0] != 0 or (n > 1 and g[1] == g[0])):
            fail(f"segment {s}: anchor BOS is not alone in the first group")
        want_loss = (p != 0).astype(loss.dtype)
        if not np.array_equal(loss[idx], want_loss):
            fail(f"segment {s}: loss_mask must be 1 everywhere but the leading BOS")
        segments.append({"positions": p, "groups": g - g.min(), "tokens": t[by_pos]})
    return segments


def mean_group_size(batch: dict) -> float:
    """Mean number of real (non-padding) tokens per group in a batch: 1.0 under AR, about k under
    blocks:k / random:k. The trainer logs it as a live check that the curriculum stage is what the data
    delivers. Rows are in the sorted layout (by segment, then group), so a group is a run of equal
    (segment, group) ids."""
    seg, grp = np.asarray(batch["segment_ids"]), np.asarray(batch["groups"])
    real = seg != 0
    new = np.ones_like(real)
    new[:, 1:] = (seg[:, 1:] != seg[:, :-1]) | (grp[:, 1:] != grp[:, :-1])
    n_groups = int((new & real).sum())
    return float(real.sum()) / max(n_groups, 1)
