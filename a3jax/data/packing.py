"""Packing documents into fixed-length rows, and laying a row out in generation order.

Packing (decided once, deterministically, when the dataset is built):

* every document becomes BOS + tokens + EOS; documents go into rows of `seq_len` tokens greedily in a
  (seeded) shuffled document order (next fit: a segment that does not fit closes the row);
* a document longer than `seq_len - 2` tokens is split into pieces; every piece starts with its own
  BOS at position 0 (so it is a well-formed segment and the anchor rule applies to it), pieces hold
  `seq_len - 1` tokens, and only the last piece ends with EOS. Each piece is its own segment: no
  attention crosses pieces or documents;
* `segment_ids` number the pieces of a row 1, 2, ...; `positions` restart at 0 in every segment.

Layout (per example, see `layout_row`): every segment draws its own groups (a3jax.data.grouping), or,
with a batch-shared grouping, takes the groups of its slots from the batch's one grouping; the
group ids of segment s are offset past those of segments < s so they are globally non-decreasing,
and the row is stably sorted by group, i.e. by (segment, group, original position), with tokens,
positions and segment ids carried along. Padding comes last: token = pad id, segment 0, position 0,
group = (largest real group) + 1, so every group id is in [0, seq_len].

Loss mask (int32): 1 on every non-padding token except a segment's leading BOS (position 0), which is
conditioning, never a target (it is in the anchor group, predicted from nothing). EOS is a target.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from a3jax.layout import LAYOUT_KEYS, Layout

from .grouping import example_rng, group_document


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Segments (doc, start, end, has_eos) and rows (row_ptr into the segment arrays)."""

    seq_len: int
    seg_doc: np.ndarray  # int64 [S]
    seg_start: np.ndarray  # int64 [S] token offset in the document
    seg_end: np.ndarray  # int64 [S]
    seg_eos: np.ndarray  # bool [S]
    row_ptr: np.ndarray  # int64 [R + 1]

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def split_document(n: int, seq_len: int) -> list[tuple[int, int, bool]]:
    """Pieces (start, end, has_eos) of an n-token document so each BOS+piece(+EOS) fits seq_len."""
    out, start = [], 0
    while n - start > seq_len - 2:
        out.append((start, start + seq_len - 1, False))
        start += seq_len - 1
    out.append((start, n, True))
    return out


def plan_packing(lengths: Sequence[int], seq_len: int, order: Optional[np.ndarray] = None) -> PackingPlan:
    """Greedy next-fit packing of documents (in `order`, default as given) into rows of seq_len."""
    if seq_len < 4:
        raise ValueError(f"data.seq_len must be >= 4, got {seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    seg_doc, seg_start, seg_end, seg_eos, row_ptr = [], [], [], [], [0]
    fill = 0
    for d in order.tolist():
        for start, end, eos in split_document(int(lengths[d]), seq_len):
            size = end - start + 1 + eos
            if fill + size > seq_len:
                row_ptr.append(len(seg_doc))
                fill = 0
            seg_doc.append(d)
            seg_start.append(start)
            seg_end.append(end)
            seg_eos.append(eos)
            fill += size
    if fill:
        row_ptr.append(len(seg_doc))
    return PackingPlan(seq_len, np.asarray(seg_doc, np.int64), np.asarray(seg_start, np.int64),
                       np.asarray(seg_end, np.int64), np.asarray(seg_eos, bool),
                       np.asarray(row_ptr, np.int64))


class PackedRows:
    """Random-access packed rows (before grouping): {tokens, positions, segment_ids} int32 [seq_len]."""

    def __init__(self, corpus, plan: PackingPlan, bos_id: int, eos_id: int, pad_id: int):
        self.corpus = corpus
        self.plan = plan
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, r: int) -> dict:
        p, T = self.plan, self.plan.seq_len
        r = int(r)
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} out of range [0, {len(self)})")
        tokens = np.full(T, self.pad_id, np.int32)
        positions = np.zeros(T, np.int32)
        segs = np.zeros(T, np.int32)
        at = 0
        for k, s in enumerate(range(p.row_ptr[r], p.row_ptr[r + 1]), 1):
            doc = self.corpus.doc(int(p.seg_doc[s]))
            piece = doc[p.seg_start[s]:p.seg_end[s]]
            n = len(piece) + 1 + int(p.seg_eos[s])
            tokens[at] = self.bos_id
            tokens[at + 1:at + 1 + len(piece)] = piece
            if p.seg_eos[s]:
                tokens[at + n - 1] = self.eos_id
            positions[at:at + n] = np.arange(n, dtype=np.int32)
            segs[at:at + n] = k
            at += n
        return {"tokens": tokens, "positions": positions, "segment_ids": segs}


def layout_row(row: dict, strategy: str, rng: np.random.Generator, anchor_bos: bool, bos_id: int,
               slot_groups: Optional[np.ndarray] = None) -> dict:
    """Packed row (segments contiguous, positions from 0) -> generation-order layout with groups.

    Returns the a3jax.layout dict (exactly LAYOUT_KEYS, int32 [T]) sorted by (segment, group).
    `bos_id` is the tokenizer's (it marks each segment's leading BOS, which is not a target).
    Each segment is one document to the strategy, which sees its token ids (a3jax.data.grouping).
    `slot_groups` (int [T], a grouping of the row's T slots shared by every row of a batch) replaces the
    per-segment draw: each segment keeps the order of its slots' groups (re-ranked; with anchor_bos its
    BOS first, alone), and `strategy` / `rng` are unused.
    """
    tokens = np.asarray(row["tokens"], np.int32)
    positions = np.asarray(row["positions"], np.int32)
    segs = np.asarray(row["segment_ids"], np.int32)
    T = len(tokens)
    groups = np.empty(T, np.int32)
    offset = 0
    real = np.flatnonzero(segs)
    if len(real):
        # segment boundaries (segments are contiguous runs of equal nonzero ids)
        cut = np.flatnonzero(np.diff(segs[real]) != 0) + 1
        for run in np.split(real, cut):
            order_in_seg = np.argsort(positions[run], kind="stable")
            run = run[order_in_seg]
            if slot_groups is None:
                g = group_document(strategy, len(run), rng, anchor_bos, tokens=tokens[run])
            else:
                g = np.asarray(slot_groups)[run].astype(np.int64)
                if anchor_bos and len(run) > 1:
                    g[0] = g.min() - 1
                g = np.unique(g, return_inverse=True)[1].astype(np.int32).reshape(-1)
            groups[run] = g + offset
            offset += int(g.max()) + 1
    groups[segs == 0] = offset
    order = np.argsort(groups, kind="stable")
    tokens, positions, groups, segs = tokens[order], positions[order], groups[order], segs[order]
    is_bos = (positions == 0) & (tokens == bos_id)
    loss_mask = ((segs != 0) & ~is_bos).astype(np.int32)
    return Layout(tokens, positions, groups, segs, loss_mask).as_dict()


def _encode_all(docs, tokenizer) -> list[np.ndarray]:
    out = []
    for d in docs:
        if isinstance(d, str):
            if tokenizer is None:
                raise ValueError("pack_documents got text but no tokenizer")
            out.append(tokenizer.encode_np(d))
        else:
            out.append(np.asarray(d, np.int32))
    return out


def pack_documents(docs, seq_len: int, tokenizer=None, strategy: str = "ar", seed: int = 0,
                   anchor_bos: bool = True, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                   pad_id: Optional[int] = None) -> dict:
    """Texts or token-id lists -> a layout batch dict (LAYOUT_KEYS) [R, seq_len] in source order (no
    shuffling).

    Special ids come from `tokenizer` unless given. Row r's groups use example_rng(seed, r).
    """
    bos_id = tokenizer.bos_id if bos_id is None else bos_id
    eos_id = tokenizer.eos_id if eos_id is None else eos_id
    pad_id = tokenizer.pad_id if pad_id is None else pad_id
    arrays = _encode_all(docs, tokenizer)

    class _Mem:
        def doc(self, i):
            return arrays[i]

    plan = plan_packing([len(a) for a in arrays], seq_len)
    rows = PackedRows(_Mem(), plan, bos_id, eos_id, pad_id)
    laid = [layout_row(rows[r], strategy, example_rng(seed, r), anchor_bos, bos_id) for r in range(len(rows))]
    return {k: np.stack([x[k] for x in laid]) for k in LAYOUT_KEYS}


def make_row(text, tokenizer, seq_len: Optional[int] = None, strategy: str = "ar", seed: int = 0,
             anchor_bos: bool = True) -> dict:
    """One document (text or ids) -> a single-row batch [1, T] (T = len + 2 unless seq_len is given).

    Raises ValueError when the document does not fit one row of seq_len.
    """
    ids = _encode_all([text], tokenizer)[0]
    n = len(ids) + 2
    T = n if seq_len is None else int(seq_len)
    if n > T:
        raise ValueError(f"document of {len(ids)} tokens (+BOS+EOS = {n}) does not fit seq_len={T}")
    return pack_documents([ids], max(T, 4), tokenizer, strategy, seed, anchor_bos)
