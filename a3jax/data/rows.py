"""Rows built outside the training pipeline, defined once: decode, score, eval and the demo share them.

Training rows come from `packing.layout_row`. Every other row the model sees (a prompt, a scored
text, an eval continuation, an infill blank) gets its group ids and its placeholders here:

    strategy_groups(strategy, length, seed, index)   one document under a grouping strategy, its
                                                     randomness from example_rng(seed, index)
    window_index(index, window)                      the example index of a window of a long text
    prompt_groups(known, chunk)                      known tokens as one group 0, or AR chunks of `chunk`
    context_target_groups(n_context, n_target, ...)  BOS, then the context, then the target in AR chunks
    text_row(bos_id, ids, strategy, seed, index)     BOS + a text under a strategy, the text the target
    placeholder_id(tokenizer)                        the token that stands in a blank before it is filled
    blank_rows(rows, length, pad_id, placeholder)    infill rows (one blank span each) padded into a batch
    pad_rows(rows, length, batch, pad_id)            scoring rows padded into a numpy `Layout` batch
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from a3jax.layout import Layout

from .grouping import example_rng, group_document

# Windows of one text get example indices index * WINDOW_STRIDE + window: distinct for every
# (text, window) pair as long as a text has fewer windows than this prime.
WINDOW_STRIDE = 1_000_003


def strategy_groups(strategy: str, length: int, seed: int, index: int = 0, anchor_bos: bool = True,
                    tokens=None) -> np.ndarray:
    """Group ids [length] of one document under a grouping strategy of a3jax.data.grouping ('ar',
    'blocks:k', 'random:k', ...), deterministic in (seed, index); with anchor_bos position 0 (BOS) is
    alone in group 0. `tokens` (int [length], BOS first) are the document's ids, for the strategies
    that need them (e.g. infill:...:repeat)."""
    return group_document(strategy, length, example_rng(seed, index), anchor_bos=anchor_bos, tokens=tokens)


def window_index(index: int, window: int) -> int:
    """Example index of window `window` of text `index` (its strategy_groups draw)."""
    return index * WINDOW_STRIDE + window


def prompt_groups(known: np.ndarray, chunk: Optional[int]) -> np.ndarray:
    """Group ids [..., T] of the known (prompt) tokens of rows `known` [..., T] (bool): all in group 0
    when chunk is None, else AR chunks: the k-th known token of a row is in group k // chunk. Values at
    unknown positions are the chunk of the known tokens before them (0 before the first)."""
    known = np.asarray(known)
    if chunk is None:
        return np.zeros(known.shape, np.int64)
    return np.maximum(np.cumsum(known, axis=-1) - 1, 0) // int(chunk)


def context_target_groups(n_context: int, n_target: int, group_size: int = 1,
                          context_order: str = "ar") -> np.ndarray:
    """Group ids (int32 [1 + n_context + n_target]) of BOS + context + target: BOS alone in group 0;
    the context after it, one token per group ('ar') or all in one group (any other order, e.g.
    'one'); then the target as AR chunks of group_size."""
    cg = np.arange(1, n_context + 1) if context_order == "ar" else np.ones(n_context, np.int64)
    start = (int(cg.max()) + 1) if n_context else 1
    g = np.concatenate([[0], cg, start + np.arange(n_target) // max(int(group_size), 1)])
    return g.astype(np.int32)


def text_row(bos_id: int, ids: Sequence[int], strategy: str, seed: int, index: int):
    """(ids, groups, target) of BOS + ids: the strategy orders the text after the anchored BOS (from
    example_rng(seed, index)); every text token is a target, BOS is conditioning."""
    row = np.asarray([int(bos_id)] + list(ids))
    target = np.ones(len(row), bool)
    target[0] = False
    return row, strategy_groups(strategy, len(row), seed, index, tokens=row).astype(np.int32), target


def placeholder_id(tokenizer) -> int:
    """The token a blank holds before it is filled: the tokenizer's MASK, else its PAD. The model never
    reads it (a blank is in a later group than everything that conditions on it); it only shows
    where a blank was left unfilled."""
    mask = getattr(tokenizer, "mask_id", None)
    return int(mask) if mask is not None else int(tokenizer.pad_id)


def blank_rows(rows, length: int, pad_id: int, placeholder: int):
    """rows: [(ids, start, n)]: token ids with one blank span [start, start + n) -> (tokens int32,
    known bool, valid bool), each [len(rows), length]. The span holds `placeholder` and is the only
    unknown part; positions after a row's ids are padding (pad_id, valid False)."""
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    known = np.ones((b, length), bool)
    valid = np.zeros((b, length), bool)
    for r, (ids, start, n) in enumerate(rows):
        tokens[r, :len(ids)] = ids
        valid[r, :len(ids)] = True
        tokens[r, start:start + n] = placeholder
        known[r, start:start + n] = False
    return tokens, known, valid


def pad_rows(rows, length: int, batch: int, pad_id: int) -> Layout:
    """rows: [(ids, groups, target)] (at most `batch`, each at most `length` long) -> a numpy int32
    `Layout` [batch, length]: positions arange(length), one segment per row, loss_mask = target;
    padding (and the rows past len(rows)) is segment 0, token pad_id, group 0, no target."""
    tokens = np.full((batch, length), pad_id, np.int32)
    groups = np.zeros((batch, length), np.int32)
    segs = np.zeros((batch, length), np.int32)
    target = np.zeros((batch, length), np.int32)
    for i, (ids, g, m) in enumerate(rows):
        n = len(ids)
        tokens[i, :n], groups[i, :n], segs[i, :n], target[i, :n] = ids, g, 1, m
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return Layout(tokens, positions, groups, segs, target)
