"""`a3jax data prepare`: tokenize a source once into ArrayRecord shards for random-access training.

Output directory layout:

    a3jax_data.json          format, tokenizer (spec, vocab size, BOS/EOS/PAD ids), token dtype,
                             shard list, document/token counts, skipped-file summary, source
    index.npz                keys (document keys, used for the held-out split) and lengths (tokens)
    data-00000.array_record  one record per document: its token ids (no BOS/EOS) as raw little-endian
    ...                      uint16 (vocab <= 65536) or int32

Every document of the source is written (split = all); the train/held-out split is applied when the
directory is read back as a source (`data.source: DIR`), by the same key hash as for raw files.
Tokenization runs in parallel over files (`num_workers` processes); the order of the output does not
depend on the number of workers. Empty, binary and undecodable inputs are skipped and counted.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from a3jax import fs

from .sources import (PREPARED_FORMAT, PREPARED_META, PREPARED_VERSION, SkipStats, read_file_documents,
                      resolve_files, tokenize_texts)
from .tokenizers import load_tokenizer

_WORKER_TOKENIZER = None  # set once per worker process by _init_worker


def _init_worker(tokenizer_spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_spec)


def _tokenize_file(job):
    path, key, text_field, dtype = job
    docs, skips = read_file_documents(path, key, text_field)
    ids = tokenize_texts(_WORKER_TOKENIZER, [t for _, t in docs]) if docs else []
    return [(k, a.astype(dtype).tobytes()) for (k, _), a in zip(docs, ids)], skips


def prepare(source: str, tokenizer: str, out_dir: str, num_workers: int = 0, text_field: str = "text",
            docs_per_shard: int = 10000, max_documents: int = 0, progress: bool = True) -> dict:
    """Tokenizes `source` into ArrayRecord shards under `out_dir`; returns the written metadata."""
    t0 = time.time()
    tok = load_tokenizer(tokenizer)  # fail early (missing file, missing BOS/EOS) in this process
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<i4")
    root, files = resolve_files(source)
    if fs.isdir(out_dir) and fs.listdir(out_dir):
        raise FileExistsError(f"output directory is not empty: {out_dir}")
    target = out_dir
    if fs.is_gcs(out_dir):
        # ArrayRecord writes local files only: the shards are written here, then uploaded, metadata
        # last (its presence is what marks a prepared directory, so a half upload is never read)
        out_dir = tempfile.mkdtemp(prefix="a3jax-prepare-")
    fs.makedirs(out_dir)
    jobs = [(p, fs.relpath(p, root), text_field, dtype.str) for p in files]
    skips = SkipStats()
    keys: list[str] = []
    lengths: list[int] = []
    shards: list[dict] = []
    writer = None

    def write(k: str, raw: bytes) -> None:
        nonlocal writer
        if writer is None or shards[-1]["num_records"] >= docs_per_shard:
            if writer is not None:
                writer.close()
            name = f"data-{len(shards):05d}.array_record"
            writer = ArrayRecordWriter(fs.join(out_dir, name), "group_size:1")
            shards.append({"file": name, "num_records": 0})
        writer.write(raw)
        shards[-1]["num_records"] += 1
        keys.append(k)
        lengths.append(len(raw) // dtype.itemsize)

    bar = tqdm(total=len(jobs), unit="file", desc="prepare", disable=not progress, file=sys.stderr)
    pool: Optional[cf.ProcessPoolExecutor] = None
    try:
        if num_workers and num_workers > 1:
            pool = cf.ProcessPoolExecutor(num_workers, mp_context=mp.get_context("spawn"),
                                          initializer=_init_worker, initargs=(tokenizer,))
            results = pool.map(_tokenize_file, jobs, chunksize=max(1, min(64, len(jobs) // (4 * num_workers))))
        else:
            _init_worker(tokenizer)
            results = map(_tokenize_file, jobs)
        for docs, s in results:
            skips.merge(s)
            for k, raw in docs:
                if max_documents and len(keys) >= max_documents:
                    break
                write(k, raw)
            bar.update(1)
            if max_documents and len(keys) >= max_documents:
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not keys:
        raise ValueError(f"data source {source!r} produced no documents; {skips.summary()}")
    np.savez(fs.join(out_dir, "index.npz"), keys=np.asarray(keys, dtype=str),
             lengths=np.asarray(lengths, np.int64))
    meta = {
        "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "source": source, "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "dtype": dtype.str, "index": "index.npz", "shards": shards, "num_documents": len(keys),
        "num_tokens": int(sum(lengths)), "num_files": len(files), "skipped": skips.counts,
        "skipped_examples": skips.examples, "seconds": round(time.time() - t0, 3),
    }
    meta_text = json.dumps(meta, indent=1)
    if target != out_dir:
        fs.upload_dir(out_dir, target)
        shutil.rmtree(out_dir)  # our own temporary directory
    fs.write_text(fs.join(target, PREPARED_META), meta_text)
    return meta


def cli_main(argv: list[str]) -> int:
    """`a3jax data prepare --source S --tokenizer T --out DIR` (a leading 'prepare' is accepted)."""
    argv = list(argv)
    if argv and argv[0] == "prepare":
        argv = argv[1:]
    ap = argparse.ArgumentParser(
        prog="a3jax data prepare",
        description="Tokenize a text source into ArrayRecord shards (pre-tokenized, random access). "
                    "Use the output directory as data.source.")
    ap.add_argument("--source", required=True,
                    help="stdlib | file | directory | glob | *.jsonl | *.parquet")
    ap.add_argument("--tokenizer", default="byte", help="byte | tokenizer.json | model directory")
    ap.add_argument("--out", required=True, help="output directory (must be empty or new)")
    ap.add_argument("--text-field", default="text", help="JSONL/Parquet text field (default: text)")
    ap.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizer processes (default: all cores; 0/1 = in process)")
    ap.add_argument("--docs-per-shard", type=int, default=10000)
    ap.add_argument("--max-documents", type=int, default=0, help="stop after N documents (0 = all)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.source, args.tokenizer, args.out, args.num_workers, args.text_field,
                       args.docs_per_shard, args.max_documents, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(meta["skipped"].items())) or "none"
    print(f"wrote {meta['num_documents']} documents, {meta['num_tokens']} tokens in "
          f"{len(meta['shards'])} shard(s) to {args.out} ({meta['seconds']} s); "
          f"files read: {meta['num_files']}; skipped: {skipped}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
