"""Data: sources, tokenizers, packing, grouping strategies, curriculum, and the Grain pipeline.

See docs/data.md. Entry points used by the trainer, the decoder and the CLI:

    make_train_iterator(data_cfg, global_batch_size, process_index=0, process_count=1, start_step=0)
    make_eval_batches(data_cfg, batch_size, strategy, num_batches)
    to_global_batch(batch, mesh, rules)     sharded as a3jax.sharding.batch_sharding(mesh, rules)
    load_tokenizer(spec); make_groups(strategy, length, rng); stage_for_step(stages, step)
    pack_documents(docs, seq_len, tokenizer, ...); make_row(text, tokenizer, ...)
    prepare(source, tokenizer, out_dir, num_workers); prepare.cli_main(argv)
"""
from .grouping import (example_rng, group_document, load_curriculum, make_groups, parse_strategy,
                       register_strategy,
                       stage_for_step, strategies, validate_stages)
from .packing import PackedRows, layout_row, make_row, pack_documents, plan_packing
from .pipeline import (EVAL_STAGE, build_rows, make_eval_batches, make_train_dataset,
                       make_train_iterator, to_global_batch)
from .sources import Corpus, EmptyCorpusError, SkipStats, load_corpus
from .tokenizers import ByteTokenizer, HFTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ByteTokenizer", "Corpus", "EVAL_STAGE", "EmptyCorpusError", "HFTokenizer", "PackedRows",
    "SkipStats", "TokenizerError", "build_rows", "example_rng", "group_document", "layout_row",
    "load_corpus", "load_curriculum", "load_tokenizer", "make_eval_batches", "make_groups", "make_row",
    "make_train_dataset", "make_train_iterator", "pack_documents", "parse_strategy", "plan_packing",
    "register_strategy", "stage_for_step", "strategies", "to_global_batch", "validate_stages",
]
