"""The Grain pipeline: packed rows -> per-example groups in generation order -> per-process batches.

    MapDataset.source(PackedRows)            rows packed once from the seeded-shuffled documents
      .shuffle(shuffle_seed).repeat()        a fresh row order every epoch (Grain reseeds each epoch)
      .map_with_index(ExampleLayout)         index = global example index (epochs included): the
                                             strategy comes from the curriculum stage of global step
                                             index // global_batch_size, the groups from
                                             default_rng([grouping_seed, index, 0]), or with
                                             data.grouping_scope=batch one grouping of the
                                             row's slots per step from
                                             default_rng([grouping_seed, step, 1]), shared by
                                             every row of the global batch (a strategy that
                                             needs the document's tokens, infill:...:repeat,
                                             is rejected there: the rows are different documents)
      [process_index::process_count]         per-process shard
      .batch(global_batch // process_count)  batch j of every process holds global step j
      .to_iter_dataset(ReadOptions)          threads prefetch `prefetch` batches (0 = synchronous)
      .mp_prefetch(...)                      when worker_count > 0

Batch dict (numpy, int32, shape [B_local, seq_len] unless noted):

    tokens, positions, groups, segment_ids, loss_mask   see a3jax.data.packing (generation-order layout)
    stage          [B_local]  curriculum stage index of the example (all equal within a batch; -1 for
                              eval batches with a fixed strategy)
    example_index  [B_local]  global example index (metadata for tests and debugging)

Resume: the returned iterator is a `grain.DatasetIterator`; save it with
`grain.checkpoint.CheckpointSave(it)` in an Orbax `CheckpointManager` (or `it.get_state()`) and restore
with `CheckpointRestore(it)` / `set_state` into an iterator built from the same config: the following
batches are exactly those of the uninterrupted run.
"""
from __future__ import annotations

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax.config import GROUPING_SCOPES
from a3jax.sharding import batch_sharding

from .grouping import (batch_rng, example_rng, group_document, parse_strategy, stage_for_step,
                       strategy_needs_tokens, validate_stages)
from .packing import PackedRows, layout_row, plan_packing
from .sft import SFTRows, layout_sft_row
from .sources import load_corpus
from .tokenizers import load_tokenizer

EVAL_STAGE = -1


class ExampleLayout:
    """Grain map_with_index transform: (global example index, packed row) -> laid-out example."""

    def __init__(self, stages, global_batch_size: int, grouping_seed: int, anchor_bos: bool,
                 bos_id: int, fixed_strategy: str = "", grouping_scope: str = "example"):
        if grouping_scope not in GROUPING_SCOPES:
            raise ValueError(f"data.grouping_scope {grouping_scope!r} is not one of {GROUPING_SCOPES}")
        self.stages = tuple((s.strategy, s.steps) if hasattr(s, "strategy") else tuple(s) for s in stages)
        self.global_batch_size = int(global_batch_size)
        self.grouping_seed = int(grouping_seed)
        self.anchor_bos = bool(anchor_bos)
        self.bos_id = int(bos_id)
        self.fixed_strategy = fixed_strategy
        self.grouping_scope = grouping_scope
        if grouping_scope == "batch":  # one grouping for rows of different documents: no tokens to see
            for strategy in [s for s, _ in self.stages] + ([fixed_strategy] if fixed_strategy else []):
                if strategy_needs_tokens(strategy):
                    raise ValueError(f"grouping strategy {strategy!r} needs each document's token ids; "
                                     f"data.grouping_scope=batch shares one grouping across the rows of a "
                                     f"batch (different documents): use grouping_scope=example")
        self._shared: tuple = (None, None)  # (key, slot groups) of the last batch: its rows come in a run

    def _batch_groups(self, step: int, strategy: str, length: int) -> np.ndarray:
        """One grouping of the T slots of a row per global step (drawn as for one T-token document)."""
        key = (step, strategy, length)
        cached = self._shared  # one read: another reader thread may replace it meanwhile
        if cached[0] != key:
            cached = (key, group_document(strategy, length, batch_rng(self.grouping_seed, step), self.anchor_bos))
            self._shared = cached
        return cached[1]

    def __call__(self, index: int, row: dict) -> dict:
        step = index // self.global_batch_size
        if self.fixed_strategy:
            stage, strategy = EVAL_STAGE, self.fixed_strategy
        else:
            stage, strategy = stage_for_step(self.stages, step)
        shared = None
        if self.grouping_scope == "batch":
            shared = self._batch_groups(step, strategy, len(row["tokens"]))
        if "response" in row:  # an SFT row (a3jax.data.sft): the context, then the response grouped
            out = layout_sft_row(row, strategy, example_rng(self.grouping_seed, index))
        else:
            out = layout_row(row, strategy, example_rng(self.grouping_seed, index), self.anchor_bos,
                             self.bos_id, slot_groups=shared)
        out["stage"] = np.int32(stage)
        out["example_index"] = np.int32(index)
        return out


def build_rows(data_cfg, split: str | None = None, tokenizer=None) -> PackedRows:
    """Loads the corpus of `split` (default data_cfg.split) and packs it into random-access rows
    (data.format sft: SFT examples, a3jax.data.sft.SFTRows)."""
    tokenizer = tokenizer or load_tokenizer(data_cfg.tokenizer)
    if getattr(data_cfg, "format", "text") == "sft":
        return SFTRows(data_cfg.source, tokenizer, data_cfg.seq_len, split or data_cfg.split,
                       data_cfg.heldout_fraction, data_cfg.shuffle_seed, data_cfg.max_documents,
                       response_pad=data_cfg.sft_response_pad)
    corpus = load_corpus(data_cfg.source, tokenizer, split or data_cfg.split, data_cfg.heldout_fraction,
                         data_cfg.max_documents, data_cfg.text_field)
    order = np.random.default_rng([int(data_cfg.shuffle_seed) & 0xFFFFFFFF, 1]).permutation(len(corpus))
    plan = plan_packing(corpus.lengths, data_cfg.seq_len, order)
    return PackedRows(corpus, plan, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def _check_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    return global_batch_size // process_count


def make_train_dataset(data_cfg, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                       start_step: int = 0, rows: PackedRows | None = None):
    """The per-process `grain.IterDataset` of training batches (see the module docstring)."""
    local = _check_batch(global_batch_size, process_index, process_count)
    validate_stages(data_cfg.stages)
    rows = rows if rows is not None else build_rows(data_cfg)
    tok_bos = rows.bos_id
    ds = grain.MapDataset.source(rows).shuffle(seed=int(data_cfg.shuffle_seed)).repeat()
    ds = ds.map_with_index(ExampleLayout(data_cfg.stages, global_batch_size, data_cfg.grouping_seed,
                                         data_cfg.anchor_bos, tok_bos, grouping_scope=data_cfg.grouping_scope))
    ds = ds[process_index::process_count].batch(local, drop_remainder=True)
    if start_step:
        ds = ds[int(start_step):]
    return _to_iter(ds, data_cfg)


def _to_iter(ds, data_cfg):
    prefetch = max(0, int(data_cfg.prefetch))
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(1, prefetch))
    it_ds = ds.to_iter_dataset(read)
    if data_cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_cfg.worker_count), per_worker_buffer_size=max(1, prefetch)))
    return it_ds


def make_train_iterator(data_cfg, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0):
    """Iterator of this process's training batches (numpy dicts [global_batch/process_count, seq_len]).

    Resume from a saved iterator state (grain.checkpoint via Orbax) rather than start_step; start_step
    only skips the first batches of a fresh run, and a saved state must be restored into an iterator
    built with the same start_step.
    """
    return iter(make_train_dataset(data_cfg, global_batch_size, process_index, process_count, start_step))


def make_eval_batches(data_cfg, batch_size: int, strategy: str, num_batches: int,
                      split: str = "heldout") -> list[dict]:
    """`num_batches` deterministic batches [batch_size, seq_len] of the held-out split, grouped with a
    fixed `strategy` (rows in packing order, wrapping around when the split is short; stage = -1)."""
    parse_strategy(strategy)
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be positive, got {batch_size}, {num_batches}")
    rows = build_rows(data_cfg, split=split)
    layout = ExampleLayout((), batch_size, data_cfg.grouping_seed, data_cfg.anchor_bos, rows.bos_id,
                           fixed_strategy=strategy)
    out = []
    for b in range(num_batches):
        ex = [layout(i, rows[i % len(rows)]) for i in range(b * batch_size, (b + 1) * batch_size)]
        out.append({k: np.stack([e[k] for e in ex]) for k in ex[0]})
    return out


def to_global_batch(batch, mesh, rules):
    """Per-process numpy batch (a dict or an a3jax.layout.Layout; any pytree of arrays) -> the same
    tree of global jax.Arrays sharded as `a3jax.sharding.batch_sharding(mesh, rules)`, the sharding
    the train and eval steps pin their batch to (the batch dim over the mesh axes of the `batch` rule).

    JAX infers the global shape from the sharding (the local batch times the number of processes the
    batch axes span).
    """
    def put(v):
        v = np.asarray(v)
        sharding = batch_sharding(mesh, rules, v.ndim) if v.ndim else NamedSharding(mesh, P())
        return jax.make_array_from_process_local_data(sharding, v)

    return jax.tree.map(put, batch)
