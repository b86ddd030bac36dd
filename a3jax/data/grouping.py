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
    infill[:rate[:span[:k[:order[:where]]]]]  random spans (lengths uniform 1..span, default 8) covering
                         about `rate` (default 0.25) of the positions become the blanks; the context (all
                         other positions) comes first in left-to-right order, one token per group; the
                         blanks follow in groups of k (default 4), in random order (order `random`, the
                         default) or left to right (`ltr`: each span is written as a plain LM writes it,
                         with the suffix visible). Position 0 is never a blank.
                         `where` picks the spans: `any` (the default) anywhere; `repeat` (needs the
                         document's tokens) spans of 2..span tokens, longest first, whose token sequence
                         also occurs elsewhere in the document, that occurrence left entirely in the
                         context, so the answer can be copied (repeat_blanks); random spans fill up to
                         `rate` when no such span is left.

A new strategy is one function:

    @register_strategy("name")
    def _name(length: int, rng: np.random.Generator, *args: str) -> np.ndarray: ...

`args` are the strings after the name; raise `ValueError` for bad ones (`parse_strategy` turns that
into a message naming the strategy). The function may return any integer ids; `make_groups` ranks
them densely.

A strategy that looks at the document's token ids registers with `tokens=needs`, `needs(args) -> bool`
saying whether those arguments need them; it is then called as `fn(length, rng, *args, tokens=ids)`
(ids int [length] or None). `make_groups(..., tokens=ids)` / `group_document(..., tokens=ids)` pass
them (the data pipeline, packing and rows do); a strategy whose arguments need them and gets none is
an error naming it (`strategy_needs_tokens` tells beforehand: e.g. data.grouping_scope=batch, one
grouping shared by rows of different documents, rejects such a strategy).

Anchor BOS (`group_document(..., anchor_bos=True)`): position 0 (the document's BOS) is alone in group
0 and the strategy orders positions 1..length-1 in groups 1..K.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np

from a3jax import objectives
from a3jax.config import CONFIG_ROOT, DataConfig, build, parse_yaml

StrategyFn = Callable[..., np.ndarray]
_REGISTRY: dict[str, StrategyFn] = {}
_TOKEN_NEEDS: dict[StrategyFn, Callable[[tuple], bool]] = {}  # token-aware strategy fns: args -> needs tokens


def register_strategy(name: str, tokens: Callable[[tuple], bool] | None = None):
    """Decorator: registers `fn(length, rng, *args) -> group ids` under `name`; with `tokens`
    (args -> whether they need the token ids) fn also takes `tokens=` (see the module docstring)."""

    def deco(fn: StrategyFn) -> StrategyFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"grouping strategy {name!r} is already registered")
        _REGISTRY[name] = fn
        if tokens is not None:
            _TOKEN_NEEDS[fn] = tokens
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
        if fn in _TOKEN_NEEDS:  # trial ids with repeats, so a token policy's main path runs
            fn(32, np.random.default_rng(0), *args, tokens=np.arange(32) % 5)
        else:
            fn(32, np.random.default_rng(0), *args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad grouping strategy {strategy!r}: {e}") from None
    return fn, tuple(args)


def strategy_needs_tokens(strategy: str) -> bool:
    """Whether `strategy` (checked) needs the document's token ids."""
    fn, args = parse_strategy(strategy)
    needs = _TOKEN_NEEDS.get(fn)
    return bool(needs and needs(args))


def _dense(ids: np.ndarray) -> np.ndarray:
    _, inv = np.unique(np.asarray(ids), return_inverse=True)
    return inv.astype(np.int32).reshape(-1)


def make_groups(strategy: str, length: int, rng: np.random.Generator, tokens=None) -> np.ndarray:
    """Group ids (dense ranks 0..K-1, int32) for positions 0..length-1 of one document; `tokens`
    (int [length]) are its token ids, for the strategies that look at them."""
    fn, args = parse_strategy(strategy)
    if length <= 0:
        return np.zeros(0, np.int32)
    if tokens is not None:
        tokens = np.asarray(tokens).reshape(-1)
        if len(tokens) != length:
            raise ValueError(f"grouping strategy {strategy!r}: {len(tokens)} token ids for length {length}")
    needs = _TOKEN_NEEDS.get(fn)
    if needs is not None:
        if tokens is None and needs(args):
            raise ValueError(f"grouping strategy {strategy!r} needs the document's token ids and got none "
                             f"(pass tokens=; a grouping shared by several documents has none)")
        ids = np.asarray(fn(int(length), rng, *args, tokens=tokens))
    else:
        ids = np.asarray(fn(int(length), rng, *args))
    if ids.shape != (length,):
        raise ValueError(f"grouping strategy {strategy!r} returned shape {ids.shape} for length {length}")
    return _dense(ids)


def group_document(strategy: str, length: int, rng: np.random.Generator,
                   anchor_bos: bool = True, tokens=None) -> np.ndarray:
    """make_groups plus the anchor: with anchor_bos, position 0 alone in group 0, the rest after it
    (the strategy then sees tokens[1:])."""
    if not anchor_bos or length <= 1:
        return make_groups(strategy, length, rng, tokens)
    g = np.empty(length, np.int32)
    g[0] = 0
    g[1:] = make_groups(strategy, length - 1, rng, None if tokens is None else np.asarray(tokens)[1:]) + 1
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


def _ngram_ids(tokens: np.ndarray, span: int) -> dict:
    """n -> (id of the n-gram starting at each of 0..L-n, the starts >= 1 of n-grams that occur again
    and are not one token repeated), for n in 2..span; equal ids = equal token sequences."""
    sym = np.unique(tokens, return_inverse=True)[1].reshape(-1).astype(np.int64)  # ids 0..V-1, V <= L
    vocab = int(sym.max()) + 1 if len(sym) else 1
    # changes[i]: tokens i and i+1 differ; an n-gram at s is one repeated token iff none in s..s+n-2
    changes = np.concatenate([[0], np.cumsum(sym[1:] != sym[:-1])])
    ids = sym
    out = {}
    for n in range(2, min(span, len(tokens) - 1) + 1):
        key = ids[:len(tokens) - n + 1] * vocab + sym[n - 1:]
        _, ids, counts = np.unique(key, return_inverse=True, return_counts=True)
        ids = ids.reshape(-1).astype(np.int64)
        varied = changes[n - 1:] - changes[:len(tokens) - n + 1] > 0
        cand = np.flatnonzero((counts[ids] >= 2) & varied)
        cand = cand[cand >= 1]
        if len(cand):
            out[n] = (ids, cand)
    return out


def repeat_blanks(tokens, rng: np.random.Generator, rate: float, span: int):
    """Copyable blanks: (mask, spans). spans are (start, end) pairs, 2 <= end - start <= span, not one
    token repeated, whose tokens also occur at other positions that all stay context (the copy
    source), each a maximal run of the mask (a context token on both sides, or the end). Longer spans
    are placed first (they are what copying is for; short ones often repeat by chance). Position 0 is
    never a blank. When no such span is left, random spans (lengths 1..span, never on a copy source or
    next to a copy span) fill the mask up to ~rate of 1..L-1; blanks never exceed round(rate * (L - 1))."""
    tokens = np.asarray(tokens).reshape(-1)
    length = len(tokens)
    blank = np.zeros(length, bool)
    spans: list[tuple[int, int]] = []
    if length <= 1 or rate <= 0:
        return blank, spans
    target = max(1, int(round(rate * (length - 1))))
    keep = np.zeros(length, bool)  # copy sources and the neighbours of copy spans: never blanked
    count = 0
    grams = _ngram_ids(tokens, span)
    for n in sorted(grams, reverse=True):
        inv, cand = grams[n]
        for s in cand[rng.permutation(len(cand))].tolist():
            if count + n > target:
                break
            e = s + n
            # the span: free, with a free token (or the end) on each side, so it stays a run of its own
            if blank[s - 1:e + 1].any() or keep[s:e].any():
                continue
            others = np.flatnonzero(inv == inv[s])
            others = others[(others + n <= s) | (others >= e)]  # occurrences outside the span
            free = [j for j in others.tolist() if not blank[j:j + n].any()]
            if not free:
                continue
            j = free[int(rng.integers(len(free)))]
            blank[s:e] = True
            keep[j:j + n] = True
            keep[s - 1] = True
            if e < length:
                keep[e] = True
            spans.append((s, e))
            count += n
    if count < target:  # fallback: random spans where nothing copyable is left
        for _ in range(4 * length):
            if count >= target:
                break
            n = min(int(rng.integers(1, span + 1)), target - count)
            s = int(rng.integers(1, length))
            e = min(length, s + n)
            free = ~blank[s:e] & ~keep[s:e]
            count += int(free.sum())
            blank[s:e] |= free
    return blank, spans


INFILL_BLANK_ORDERS = ("random", "ltr")
INFILL_BLANK_WHERE = ("any", "repeat")


def _infill_needs_tokens(args) -> bool:
    return len(args) > 4 and args[4] == "repeat"


@register_strategy("infill", tokens=_infill_needs_tokens)
def _infill(length, rng, *args, tokens=None):
    _no_more(args, 5)
    rate = _float(args, 0, "blank rate", default=0.25)
    span = _int(args, 1, "max span length", default=8)
    k = _int(args, 2, "blank group size k", default=4)
    order = args[3] if len(args) > 3 and args[3] else "random"
    if order not in INFILL_BLANK_ORDERS:
        raise ValueError(f"blank order must be one of {', '.join(INFILL_BLANK_ORDERS)}, got {order!r}")
    where = args[4] if len(args) > 4 and args[4] else "any"
    if where not in INFILL_BLANK_WHERE:
        raise ValueError(f"blank placement must be one of {', '.join(INFILL_BLANK_WHERE)}, got {where!r}")
    if where == "repeat":
        if span < 2:
            raise ValueError(f"max span length must be >= 2 for repeat blanks, got {span}")
        if tokens is None:
            raise ValueError("repeat blanks need the document's token ids")
        blank, _ = repeat_blanks(tokens, rng, rate, span)
    else:
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


def prompt_group_size_for(config) -> int:
    """The context layout a run's training shows its model (SFT data: 1, its context is left to right),
    else from the LAST curriculum stage the run trains (config: a3jax.config.Config): 1 when that stage's strategy puts the context left to right
    one token per group (`ar`, every `infill:...`), k for `blocks:k`, else 0 (one group, e.g. the
    random groupings, whose context has no left-to-right layout). A checkpoint records it as
    model.prompt_group_size and decoding defaults to it."""
    if objectives.of(config).decoder != "a3":
        return 0  # the content stream (ar) or the denoiser (mdlm) has no query-stream layout
    if getattr(config.data, "format", "text") == "sft":
        return 1  # SFT rows lay their context out left to right (a3jax.data.sft)
    _, strategy = stage_for_step(config.data.stages, max(config.total_steps - 1, 0))
    name, _, args = strategy.partition(":")
    if name in ("ar", "infill"):
        return 1
    if name == "blocks":
        return int(args.split(":")[0])
    return 0
