"""Decoding orders.

Fixed orders decide every blank's step before decoding starts (host side, numpy):

    left_to_right   blanks in position order, `group_size` per step (group_size 1 = plain AR)
    random          a random permutation of the blanks (from `seed`), `group_size` per step
    user grouping   an int array [T] or [B, T]: blanks with the same value form one step, steps in
                    increasing value (values at known positions are ignored)

Dynamic orders choose at every step, from the model's predictions for all remaining blanks:

    confidence      highest max-probability first
    entropy         lowest entropy first
    margin          largest gap between the two most likely tokens first
    random_dynamic  uniformly at random (re-drawn each step)

and commit either the `group_size` best blanks per step or, with a `threshold`, every blank whose
max probability is >= threshold (the single best one by the criterion when none is). Scores are
taken from the distribution tokens are drawn from (temperature, top-k, top-p; the model's own when
greedy), as the reference code does. A window (semi-autoregressive decoding) restricts the
candidates to the first W remaining blanks in position order (`first_remaining`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FIXED_ORDERS = ("left_to_right", "random")
DYNAMIC_ORDERS = ("confidence", "entropy", "margin", "random_dynamic")
ORDERS = FIXED_ORDERS + DYNAMIC_ORDERS
ALIASES = {"ltr": "left_to_right", "l2r": "left_to_right", "ar": "left_to_right",
           "dynamic_random": "random_dynamic"}


class OrderError(ValueError):
    """A bad decoding order or grouping."""


def resolve_order(order):
    """('fixed', name, None) | ('dynamic', name, None) | ('user', 'groups', int array)."""
    if isinstance(order, str):
        name = ALIASES.get(order, order)
        if name in FIXED_ORDERS:
            return "fixed", name, None
        if name in DYNAMIC_ORDERS:
            return "dynamic", name, None
        raise OrderError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)} "
                         f"or pass an int array of group ids")
    arr = np.asarray(order)
    if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
        raise OrderError(f"a user-given order must be an int array [T] or [B, T] of group ids, got "
                         f"dtype {arr.dtype} shape {arr.shape}")
    return "user", "groups", arr.astype(np.int64)


# ----------------------------------------------------------------------------- fixed schedules


def blank_ranks(blank: np.ndarray) -> np.ndarray:
    """Rank of each blank among its row's blanks in position order (-1 elsewhere)."""
    return np.where(blank, np.cumsum(blank, axis=1) - 1, -1)


def fixed_steps(kind: str, name: str, user, blank: np.ndarray, group_size: int, seed) -> np.ndarray:
    """Step index [B, T] of every blank (-1 for non-blanks); steps of a row are 0..S_b-1. seed: an
    int, or one per row [B] (the random order's permutation of row r comes from seed[r])."""
    b, t = blank.shape
    if kind == "user":
        if user.shape[-1] != t or (user.ndim == 2 and user.shape[0] not in (1, b)):
            raise OrderError(f"user grouping has shape {user.shape} but tokens have shape {(b, t)}")
        g = np.broadcast_to(user, (b, t))
        steps = np.full((b, t), -1, np.int64)
        for r in range(b):  # host-side preparation: dense rank of the row's blank group values
            _, inv = np.unique(g[r][blank[r]], return_inverse=True)
            steps[r, blank[r]] = inv.reshape(-1)
        return np.where(blank, steps, -1).astype(np.int64)
    rank = blank_ranks(blank)
    if name == "random":
        rank = rank.copy()
        seeds = np.broadcast_to(np.asarray(seed, np.int64), (b,))
        for r in range(b):  # host-side preparation only; one permutation per row from the seed
            nb = int(blank[r].sum())
            perm = np.random.default_rng(int(seeds[r])).permutation(nb)
            rank[r, blank[r]] = perm
    return np.where(blank, rank // group_size, -1)


def schedule(steps: np.ndarray, min_steps: int = 0):
    """Positions of each step: sched [B, S, K] (-1 = empty slot), S = max(most steps, min_steps),
    K = largest step. Padding S to a fixed bound lets different orders share one compiled loop."""
    b, t = steps.shape
    big = np.iinfo(np.int64).max
    s = np.where(steps >= 0, steps, big)
    order = np.argsort(s, axis=1, kind="stable")
    ss = np.take_along_axis(s, order, axis=1)
    idx = np.broadcast_to(np.arange(t), (b, t))
    new = np.concatenate([np.ones((b, 1), bool), ss[:, 1:] != ss[:, :-1]], axis=1)
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    within = idx - start
    real = ss != big
    num_steps = max(int(ss[real].max()) + 1, int(min_steps))
    k = int(within[real].max()) + 1
    sched = np.full((b, num_steps, k), -1, np.int32)
    rows = np.broadcast_to(np.arange(b)[:, None], (b, t))
    sched[rows[real], ss[real], within[real]] = order[real]
    return sched


def compact(mask: np.ndarray) -> np.ndarray:
    """Positions where mask is True, per row, left-aligned: [B, max count] (-1 = empty slot)."""
    b, t = mask.shape
    n = max(int(mask.sum(axis=1).max()), 1)
    order = np.argsort(~mask, axis=1, kind="stable")[:, :n]
    ok = np.take_along_axis(mask, order, axis=1)
    return np.where(ok, order, -1).astype(np.int32)


# ----------------------------------------------------------------------------- dynamic selection


def scores_from_probs(name: str, probs, u):
    """Higher = commit sooner: probs [B, Q, V] (the distribution tokens are drawn from) -> scores
    [B, Q] float32. u [B, Q]: the uniform draws random_dynamic ranks by."""
    probs = probs.astype(jnp.float32)
    if name == "random_dynamic":
        return jnp.broadcast_to(u, probs.shape[:-1]).astype(jnp.float32)
    if name == "confidence":
        return probs.max(-1)
    if name == "entropy":  # = -entropy; filtered-out tokens (p = 0) add nothing
        return jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    if name == "margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        return top2[..., 0] - top2[..., 1]
    raise OrderError(f"unknown dynamic criterion {name!r}")


def criterion_scores(name: str, logits, key):
    """Higher = commit sooner. logits [B, Q, V] -> scores [B, Q] (float32), from softmax(logits)."""
    u = jax.random.uniform(key, logits.shape[-2:-1])  # same draw for every row (batch invariance)
    return scores_from_probs(name, jax.nn.softmax(logits.astype(jnp.float32), axis=-1), u)


def scores_by_index(index, probs, u):
    """scores_from_probs with the criterion as a traced index into DYNAMIC_ORDERS (one compiled
    program serves every criterion; only the chosen one runs)."""
    return jax.lax.switch(index, [lambda p, u, n=n: scores_from_probs(n, p, u) for n in DYNAMIC_ORDERS], probs, u)


def first_remaining(remaining, width: int):
    """Positions [B, width] of the first `width` True entries of remaining [B, T] in position order
    (-1 = none): the compacted query rows of a dynamic step (the blanks of a window, or of a phase)."""
    b, t = remaining.shape
    rank = jnp.cumsum(remaining, axis=1) - 1
    slot = jnp.where(remaining & (rank < width), rank, width)  # out of range -> dropped
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rows = jnp.arange(b)[:, None]
    return jnp.full((b, width), -1, jnp.int32).at[rows, slot].set(pos, mode="drop")


def phase_widths(n: int, top: int, phases: int, floor: int) -> tuple:
    """Query rows of each compiled phase of a dynamic decode, descending: `top` (a bucket that holds
    every blank, or the window), then a geometric sequence down to `floor` rows, multiples of 16,
    at most `phases` entries. A phase runs while the most blanks any row still has fits in it."""
    widths = [top]
    if phases <= 1 or top <= floor:
        return tuple(widths)
    lo = max(16, -(-floor // 16) * 16)
    ratio = (lo / top) ** (1.0 / (phases - 1))
    for i in range(1, phases):  # (the last is lo itself: no float rounding up past it)
        w = lo if i == phases - 1 else max(lo, -(-int(np.ceil(top * ratio ** i - 1e-6)) // 16) * 16)
        if w < widths[-1]:
            widths.append(w)
    return tuple(widths)


# ----------------------------------------------------------------------------- finished rows


def eos_finished(tokens, filled, blank, eos_id):
    """[B] bool: the row's first committed EOS (among its blanks) has every blank before it filled:
    the row is finished; its blanks after that EOS are padding. The reference's stopping rule."""
    t = tokens.shape[1]
    pos = jnp.arange(t)[None]
    first = jnp.min(jnp.where(blank & filled & (tokens == eos_id), pos, t), axis=1)
    hole = blank & ~filled & (pos < first[:, None])
    return (first < t) & ~hole.any(axis=1)


def select_top_k(scores, available, k: int):
    """The k best available entries per row: (indices [B, k], valid [B, k]). Rows with fewer than k
    available entries get valid=False in the extra slots. Ties go to the lower index."""
    s = jnp.where(available, scores, -jnp.inf)
    vals, idx = jax.lax.top_k(s, k)
    return idx.astype(jnp.int32), vals > -jnp.inf


def select_threshold(scores, confidence, available, threshold):
    """Mask [B, Q]: every available entry with confidence >= threshold; a row where none qualifies
    commits its single best entry by `scores` (if it has any available)."""
    above = available & (confidence >= threshold)
    best = jnp.argmax(jnp.where(available, scores, -jnp.inf), axis=-1)
    fallback = jax.nn.one_hot(best, scores.shape[-1], dtype=bool) & available
    none = ~above.any(-1, keepdims=True)
    return jnp.where(none, fallback, above)
