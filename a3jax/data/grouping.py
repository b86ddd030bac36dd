"""Grouping strategies (one generation order per document) and the curriculum.

A strategy string is `name` or `name:arg:arg...`. `make_groups(strategy, length, rng)` returns int32
group ids for one document's positions 0..length-1: dense ranks 0..K-1 (every id in 0..K-1 is used;
smaller = generated earlier), deterministic given the `np.random.Generator` state.

Built-in strategies (docs/method.md for the reference numbers):

    ar                   single tokens left to right (reference 0)               sizes 1
    blocks:k             contiguous blocks of k, in order (reference 1, 2)       sizes k (last may be smaller)
    random:k             random permutation cut into groups of k; so each group is k random positions
                         and the group order is random (reference 3, 4)          sizes k (last may be smaller)
    mix:k:p              per document: random:k with probability p, else blocks:k (reference 5 = mix:8:0.5)
    sizes:uniform:kmax   any-subset: random permutation cut into groups whose sizes are drawn iid
                         uniform in 1..kmax (the last one truncated)
    sizes:geometric:p[:kmax]  sizes drawn iid Geometric(p) on 1, 2, ... (mean 1/p), capped at kmax
                         (default: no cap)
    infill[:rate[:span[:k[:order]]]]  random spans (lengths uniform 1..span, default 8) covering
                         about `rate` (default 0.25) of the positions become the blanks; the context (all
                         other positions) comes first in left-to-right order, one token per group; the
                         blanks follow in groups of k (default 4), in random order (order `random`, the
                         default) or left to right (`ltr`: each span is written as a plain LM writes it,
                         with the suffix visible). Position 0 is never a blank.

A new strategy is one function:

    @register_strategy("name")
    def _name(length: int, rng: np.random.Generator, *args: str) -> np.ndarray: ...

`args` are the strings after the name; raise `ValueError` for bad ones (`parse_strategy` turns that
into a message naming the strategy). The function may return any integer ids; `make_groups` ranks
them densely.

Anchor BOS (`group_document(..., anchor_bos=True)`): position 0 (the document's BOS) is alone in group
0 and the strategy orders positions 1..length-1 in groups 1..K.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np

from a3jax.config import CONFIG_ROOT, DataConfig, build, parse_yaml

StrategyFn = Callable[..., np.ndarray]
_REGISTRY: dict[str, StrategyFn] = {}


def register_strategy(name: str):
    """Decorator: registers `fn(length, rng, *args) -> group ids` under `name`."""

    def deco(fn: StrategyFn) -> StrategyFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"grouping strategy {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def strategies() -> list[str]:
    return sorted(_REGISTRY)


@functools.lru_cache(maxsize=256)
def parse_strategy(strategy: str) -> tuple[StrategyFn, tuple[str, ...]]:
    """`name:arg:...` -> (function, args); checks the name and the arguments (on a 32-token trial)."""
    if not isinstance(strategy, str) or not strategy:
        raise ValueError(f"grouping strategy must be a non-empty string, got {strategy!r}")
    name, *args = strategy.strip().split(":")
    fn = _REGISTRY.get(name)
    if fn is None:
        raise ValueError(f"unknown grouping strategy {strategy!r} (known: {', '.join(strategies())})")
    try:
        fn(32, np.random.default_rng(0), *args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad grouping strategy {strategy!r}: {e}") from None
    return fn, tuple(args)


def _dense(ids: np.ndarray) -> np.ndarray:
    _, inv = np.unique(np.asarray(ids), return_inverse=True)
    return inv.astype(np.int32).reshape(-1)


def make_groups(strategy: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """Group ids (dense ranks 0..K-1, int32) for positions 0..length-1 of one document."""
    fn, args = parse_strategy(strategy)
    if length <= 0:
        return np.zeros(0, np.int32)
    ids = np.asarray(fn(int(length), rng, *args))
    if ids.shape != (length,):
        raise ValueError(f"grouping strategy {strategy!r} returned shape {ids.shape} for length {length}")
    return _dense(ids)


def group_document(strategy: str, length: int, rng: np.random.Generator,
                   anchor_bos: bool = True) -> np.ndarray:
    """make_groups plus the anchor: with anchor_bos, position 0 alone in group 0, the rest after it."""
    if not anchor_bos or length <= 1:
        return make_groups(strategy, length, rng)
    g = np.empty(length, np.int32)
    g[0] = 0
    g[1:] = make_groups(strategy, length - 1, rng) + 1
    return g


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for one example: a pure function of (grouping seed, global example index)."""
    # the trailing 0 keeps every example's stream what it has always been
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0])


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of a batch-shared grouping (data.grouping_scope: batch): a pure function of
    (grouping seed, global step); the trailing 1 keeps it apart from every example's stream."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 1])


# ----------------------------------------------------------------------------- argument helpers


def _int(args: Sequence[str], i: int, what: str, default=None, minimum: int = 1) -> int:
    if i >= len(args) or args[i] == "":
        if default is None:
            raise ValueError(f"missing integer argument {what}")
        return default
    try:
        v = int(args[i])
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {args[i]!r}") from None
    if v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    return v


def _float(args: Sequence[str], i: int, what: str, default=None, lo=0.0, hi=1.0) -> float:
    if i >= len(args) or args[i] == "":
        if default is None:
            raise ValueError(f"missing number argument {what}")
        return default
    try:
        v = float(args[i])
    except ValueError:
        raise ValueError(f"{what} must be a number, got {args[i]!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {v}")
    return v


def _no_more(args: Sequence[str], n: int) -> None:
    if len(args) > n:
        raise ValueError(f"expects at most {n} argument(s), got {len(args)}: {':'.join(args)}")


def _cut(perm: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Positions in `perm` order, cut into consecutive groups of the given sizes -> ids per position."""
    g = np.empty(len(perm), np.int32)
    g[perm] = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    return g


def _draw_sizes(length: int, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    chunks, total = [], 0
    while total < length:
        s = draw(max(8, length // 2))
        chunks.append(s)
        total += int(s.sum())
    sizes = np.concatenate(chunks)
    ends = np.cumsum(sizes)
    n = int(np.searchsorted(ends, length)) + 1
    sizes = sizes[:n].copy()
    sizes[-1] -= int(ends[n - 1]) - length
    return sizes


# ----------------------------------------------------------------------------- strategies


@register_strategy("ar")
def _ar(length, rng, *args):
    _no_more(args, 0)
    return np.arange(length, dtype=np.int32)


@register_strategy("blocks")
def _blocks(length, rng, *args):
    _no_more(args, 1)
    k = _int(args, 0, "block size k")
    return np.arange(length, dtype=np.int32) // k


@register_strategy("random")
def _random(length, rng, *args):
    _no_more(args, 1)
    k = _int(args, 0, "group size k")
    g = np.empty(length, np.int32)
    g[rng.permutation(length)] = np.arange(length, dtype=np.int32) // k
    return g


@register_strategy("mix")
def _mix(length, rng, *args):
    _no_more(args, 2)
    k = _int(args, 0, "group size k")
    p = _float(args, 1, "probability p of random:k")
    if rng.random() < p:
        return _random(length, rng, str(k))
    return _blocks(length, rng, str(k))


@register_strategy("sizes")
def _sizes(length, rng, *args):
    if not args:
        raise ValueError("expects a distribution: sizes:uniform:KMAX or sizes:geometric:P[:KMAX]")
    dist = args[0]
    if dist == "uniform":
        _no_more(args, 2)
        kmax = _int(args, 1, "kmax")
        sizes = _draw_sizes(length, lambda n: rng.integers(1, kmax + 1, size=n))
    elif dist == "geometric":
        _no_more(args, 3)
        p = _float(args, 1, "p", lo=1e-6, hi=1.0)
        kmax = _int(args, 2, "kmax", default=0, minimum=0)
        cap = kmax if kmax else np.iinfo(np.int32).max
        sizes = _draw_sizes(length, lambda n: np.minimum(rng.geometric(p, size=n), cap))
    else:
        raise ValueError(f"unknown size distribution {dist!r} (uniform | geometric)")
    return _cut(rng.permutation(length), sizes)


def infill_blanks(length: int, rng: np.random.Generator, rate: float, span: int) -> np.ndarray:
    """Boolean mask of blank positions: random spans (lengths 1..span) covering ~rate of 1..length-1."""
    blank = np.zeros(length, bool)
    if length <= 1 or rate <= 0:
        return blank
    target = max(1, int(round(rate * (length - 1))))
    count = 0
    for _ in range(4 * length):
        if count >= target:
            break
        n = int(rng.integers(1, span + 1))
        n = min(n, target - count)
        start = int(rng.integers(1, length))
        end = min(length, start + n)
        count += int((~blank[start:end]).sum())
        blank[start:end] = True
    return blank


INFILL_BLANK_ORDERS = ("random", "ltr")


@register_strategy("infill")
def _infill(length, rng, *args):
    _no_more(args, 4)
    rate = _float(args, 0, "blank rate", default=0.25)
    span = _int(args, 1, "max span length", default=8)
    k = _int(args, 2, "blank group size k", default=4)
    order = args[3] if len(args) > 3 and args[3] else "random"
    if order not in INFILL_BLANK_ORDERS:
        raise ValueError(f"blank order must be one of {', '.join(INFILL_BLANK_ORDERS)}, got {order!r}")
    blank = infill_blanks(length, rng, rate, span)
    g = np.empty(length, np.int32)
    ctx = np.flatnonzero(~blank)
    g[ctx] = np.arange(len(ctx), dtype=np.int32)
    b = np.flatnonzero(blank)
    if order == "random":
        b = b[rng.permutation(len(b))]
    g[b] = len(ctx) + np.arange(len(b), dtype=np.int32) // k
    return g


# ----------------------------------------------------------------------------- curriculum


def stage_for_step(stages, step: int) -> tuple[int, str]:
    """(stage index, strategy) of a global step; stages are (strategy, steps) pairs or StageConfigs.

    Stage i covers steps [sum(steps[:i]), sum(steps[:i+1])); past the last stage, the last one stays.
    """
    if not stages:
        raise ValueError("the curriculum has no stages")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = 0
    for i, st in enumerate(stages):
        strategy, steps = (st.strategy, st.steps) if hasattr(st, "strategy") else st
        start += steps
        if step < start:
            return i, strategy
    last = stages[-1]
    return len(stages) - 1, (last.strategy if hasattr(last, "strategy") else last[0])


def validate_stages(stages, where: str = "data.stages") -> None:
    if not stages:
        raise ValueError(f"{where}: the curriculum has no stages")
    for i, st in enumerate(stages):
        strategy, steps = (st.strategy, st.steps) if hasattr(st, "strategy") else st
        if steps <= 0:
            raise ValueError(f"{where}[{i}].steps must be positive, got {steps}")
        try:
            parse_strategy(strategy)
        except ValueError as e:
            raise ValueError(f"{where}[{i}].strategy: {e}") from None


def load_curriculum(name_or_path: str):
    """Stages of a curriculum file (`paper`, `demo`, `curriculum/paper` or a path) as StageConfigs."""
    path = name_or_path
    if not os.path.isfile(path):
        base = name_or_path[len("curriculum/"):] if name_or_path.startswith("curriculum/") else name_or_path
        path = os.path.join(CONFIG_ROOT, "curriculum", base if base.endswith((".yaml", ".yml")) else base + ".yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"curriculum not found: {name_or_path} (looked for {path})")
    with open(path) as f:
        values = parse_yaml(f.read(), path)
    stages = build(DataConfig, {"stages": values.get("stages", [])}, path).stages
    validate_stages(stages, f"{path}: stages")
    return stages
