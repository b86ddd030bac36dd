"""Host-side layout of a decode call (numpy, before anything is compiled): the input checks, the
prompt buffer of `generate`, each row's seed, the group ids of the known tokens, the fixed orders'
schedule, and the EOS clean-up of the result.

Layout. A row is tokens[T] with `known` (prompt/context) positions, blanks (to fill) and padding
(`valid` False: neither). Known tokens get group ids 0 (one group) or left-to-right chunks 0, 1, ...
of `prompt_group_size`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from a3jax.config import ModelConfig
from a3jax.data import rows as rows_lib
from a3jax.decode import orders as orders_lib
from a3jax.decode.spec import DecodeError, DecodeResult, bucket_up, check_tokens, pad_token


class Prepared(NamedTuple):
    tokens: np.ndarray  # [B, T] int32
    known: np.ndarray  # [B, T] bool
    valid: np.ndarray  # [B, T] bool
    blank: np.ndarray  # [B, T] bool
    kgroups: np.ndarray  # [B, T] int32 group ids of the known tokens
    known_pos: np.ndarray  # [B, K] the known positions, left-aligned (-1 = none)
    known_groups: np.ndarray  # [B, K] their group ids
    queries: np.ndarray  # fixed orders: the schedule [B, S, K]; dynamic: unused [B, 1, 1]
    num_steps: Optional[int]  # fixed orders: steps of the schedule
    nq: int  # the largest blank count, bucketed
    kind: str  # fixed | dynamic
    criterion: str  # dynamic orders: the order's name


def as_2d(name, x, dtype):
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise DecodeError(f"{name} must be [batch, length] (or [length]), got shape {a.shape}")
    return a.astype(dtype)


def prepare(cfg: ModelConfig, tokens, known, valid, order, group_size: int, prompt_group_size: int, seed,
            num_samples: int = 1, fixed_shapes: bool = False) -> Prepared:
    """Checks the rows and lays them out. prompt_group_size 0 = the known tokens in one group.
    num_samples > 1 repeats every row that many times (rows r*n .. r*n+n-1 are the samples of row r);
    seed is then one int per output row. fixed_shapes: every shape follows T and group_size, not the
    rows' contents: the known positions take T columns (the prefill does not follow the context
    lengths), the query rows and schedule steps are T rounded up (not the most blanks of a row) and
    a fixed order's steps are group_size wide, so rows of one buffer length share a compiled loop."""
    tokens = as_2d("tokens", tokens, np.int64)
    known = np.asarray(known)
    if known.ndim == 1:
        known = known[None]
    if known.shape != tokens.shape:
        raise DecodeError(f"known has shape {known.shape} but tokens has shape {tokens.shape}; they must match")
    if known.dtype != bool:
        if not np.isin(known, (0, 1)).all():
            raise DecodeError("known must be boolean (True = keep the token, False = fill it)")
        known = known.astype(bool)
    b, t = tokens.shape
    if valid is None:
        valid = np.ones((b, t), bool)
    else:
        valid = np.asarray(valid, bool)
        if valid.ndim == 1:
            valid = valid[None]
        if valid.shape != tokens.shape:
            raise DecodeError(f"valid has shape {valid.shape} but tokens has shape {tokens.shape}")
    if t > cfg.max_position_embeddings:
        raise DecodeError(f"sequence length {t} exceeds the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}")
    check_tokens(cfg, tokens)
    known = known & valid
    blank = valid & ~known
    for r in range(b):
        if not blank[r].any():
            raise DecodeError(f"row {r} has no blanks: known is True at every valid position, nothing to fill")
        if not known[r].any():
            raise DecodeError(f"row {r} has no known token: every position is blank; give at least one "
                              f"context token (e.g. BOS) to condition on")
    try:
        kind, name, user = orders_lib.resolve_order(order)
        if num_samples > 1:
            tokens, known, valid, blank = (np.repeat(a, num_samples, axis=0) for a in (tokens, known, valid, blank))
            if user is not None and user.ndim == 2 and user.shape[0] == b and b > 1:
                user = np.repeat(user, num_samples, axis=0)
            b = b * num_samples
        kgroups = rows_lib.prompt_groups(known, prompt_group_size or None)
        known_pos = orders_lib.compact(known)
        if fixed_shapes:
            known_pos = np.pad(known_pos, ((0, 0), (0, t - known_pos.shape[1])), constant_values=-1)
        known_groups = np.take_along_axis(kgroups, np.maximum(known_pos, 0), axis=1)
        # query shapes depend on the blank count rounded up (fewer distinct compiles), or on T
        nq = bucket_up(t if fixed_shapes else blank.sum(axis=1).max())
        if kind == "dynamic":
            queries = np.zeros((b, 1, 1), np.int32)  # unused: a dynamic step picks its query rows itself
            num_steps = None
        else:
            steps = orders_lib.fixed_steps(kind, name, user, blank, group_size, seed)
            # steps padded to the blank count: every fixed order of one input shares one compiled loop
            queries = orders_lib.schedule(steps, min_steps=nq)
            if fixed_shapes:  # a step as wide as a group, however few blanks there are (-1 = none)
                width = max(queries.shape[2], min(group_size, t))
                queries = np.pad(queries, ((0, 0), (0, 0), (0, width - queries.shape[2])), constant_values=-1)
            num_steps = int(steps.max()) + 1
    except orders_lib.OrderError as e:
        raise DecodeError(str(e)) from None
    return Prepared(tokens.astype(np.int32), known, valid, blank, kgroups.astype(np.int32), known_pos,
                    known_groups.astype(np.int32), queries, num_steps, nq,
                    "dynamic" if kind == "dynamic" else "fixed", name)


def row_seeds(seed, b: int, num_samples: int, independent_rows: bool):
    """(seeds [b * n], sample index [b * n] or None) for sampling.base_keys: the one place that
    decides every row's randomness. seed: an int or a tuple of ints (SamplingParams checked it)."""
    if isinstance(seed, tuple):
        if len(seed) != b:
            raise DecodeError(f"SamplingParams.seed has {len(seed)} entries but the batch has {b} rows; give one "
                              f"seed per row")
        seeds = np.asarray(seed, np.int64)
    else:
        seeds = np.full(b, int(seed), np.int64)
    if num_samples > 1:
        return np.repeat(seeds, num_samples), np.tile(np.arange(num_samples), b)
    return seeds, (np.arange(b) if independent_rows else None)


def prompt_list(prompt_tokens) -> list:
    """A list of 1-d int64 id arrays from a [B, P] array, a list of sequences or one flat list of ids."""
    if isinstance(prompt_tokens, np.ndarray) or hasattr(prompt_tokens, "shape"):
        a = np.asarray(prompt_tokens)
        if a.ndim == 1:
            return [a.astype(np.int64)]
        if a.ndim != 2:
            raise DecodeError(f"prompts must be [batch, length] or a list of sequences, got shape {a.shape}")
        return [row.astype(np.int64) for row in a]
    seqs = list(prompt_tokens)
    if seqs and np.ndim(seqs[0]) == 0:  # one flat list of ids
        seqs = [seqs]
    return [np.asarray(s, np.int64).reshape(-1) for s in seqs]


class PromptBuffer(NamedTuple):
    tokens: np.ndarray  # [B, T] prompts left-aligned, pad elsewhere
    known: np.ndarray  # [B, T] the prompt slots
    valid: np.ndarray  # [B, T] prompt + max_new_tokens slots
    lens: np.ndarray  # [B] prompt lengths
    pad: int


def prompt_buffer(cfg: ModelConfig, prompts, max_new_tokens: int, prompt_lengths=None,
                  buffer_length: Optional[int] = None) -> PromptBuffer:
    """The [B, T] buffer of `generate`: each prompt left-aligned, then max_new_tokens blanks; T is the
    longest prompt + max_new_tokens, or buffer_length (a fixed length shares one compiled program)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    seqs = prompt_list(prompts)
    if prompt_lengths is not None:
        lens = [int(x) for x in np.asarray(prompt_lengths).reshape(-1)]
        if len(lens) != len(seqs):
            raise DecodeError(f"prompt_lengths has {len(lens)} entries for {len(seqs)} prompts")
        seqs = [s[:n] for s, n in zip(seqs, lens)]
    if not seqs:
        raise DecodeError("no prompts given")
    lens = np.array([len(s) for s in seqs])
    if (lens == 0).any():
        raise DecodeError(f"prompt {int(np.argmin(lens))} is empty; start it with BOS "
                          f"(id {cfg.bos_token_id}) at least")
    t = int(lens.max()) + int(max_new_tokens)
    if buffer_length is not None:
        if int(buffer_length) < t:
            raise DecodeError(f"buffer_length {buffer_length} is shorter than the longest prompt + max_new_tokens = {t}")
        t = int(buffer_length)
    if t > cfg.max_position_embeddings:
        raise DecodeError(f"prompt length {int(lens.max())} + max_new_tokens {max_new_tokens} = {t} exceeds "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    pad = pad_token(cfg)
    tokens = np.full((len(seqs), t), pad, np.int64)
    known = np.zeros((len(seqs), t), bool)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s
        known[r, :len(s)] = True
    valid = np.arange(t)[None] < (lens[:, None] + max_new_tokens)
    return PromptBuffer(tokens, known, valid, lens, pad)


def continuation(res: DecodeResult, lens: np.ndarray, max_new_tokens: int, pad: int, stop: bool, eos: int):
    """[B, max_new_tokens] the tokens after each prompt: pad where unfilled, and after the first EOS
    when stop."""
    new_idx = lens[:, None] + np.arange(max_new_tokens)[None]
    new = np.take_along_axis(res.tokens, new_idx, axis=1).astype(np.int32)
    new = np.where(np.take_along_axis(res.step, new_idx, axis=1) >= 0, new, pad)
    if stop:
        is_eos = new == eos
        after = np.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after the first EOS
        new = np.where(after, pad, new)
    return new.astype(np.int32)


def end_at_eos(res: DecodeResult, blank: np.ndarray, eos: int, pad: int) -> DecodeResult:
    """Each row's blanks after its first committed EOS become padding (pad token, step -1, log-prob 0);
    `eos_at` holds that EOS's position (-1 = none)."""
    t = res.tokens.shape[1]
    pos = np.arange(t)[None]
    is_eos = blank & (res.step >= 0) & (res.tokens == eos)
    first = np.where(is_eos.any(axis=1), np.argmax(is_eos, axis=1), -1)
    after = blank & (first[:, None] >= 0) & (pos > first[:, None])
    return res._replace(tokens=np.where(after, pad, res.tokens).astype(res.tokens.dtype),
                        step=np.where(after, -1, res.step), logprobs=np.where(after, 0.0, res.logprobs),
                        eos_at=first)
