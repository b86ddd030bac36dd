"""Document sources: where the text comes from, split into train/held-out, tokenized into a corpus.

A source spec (`data.source`) is one of

* `stdlib`                 the Python standard library's own .py files (found through `sysconfig` on the
                           machine that runs it; `site-packages`, `dist-packages`, `test`, `tests`,
                           `idle_test` and `__pycache__` directories are excluded), in sorted path order;
* a directory              every regular file below it, recursively, sorted (hidden entries skipped),
                           each read according to its extension as below;
* a glob (`*`, `?`, `[`)   the sorted matches, read according to their extensions;
* `*.jsonl` / `*.json`     one JSON object per line, the text in `data.text_field`;
* `*.parquet`              the `data.text_field` column (needs pyarrow);
* any other file           plain UTF-8 text, one document per file;
* a prepared directory     ArrayRecord shards written by `a3jax data prepare` (pre-tokenized, read lazily
                           with random access; recognised by its `a3jax_data.json`).

Every document has a stable key (relative path, `path:line` for JSONL, `path:row` for Parquet). The
held-out split is by key: a document is held out iff sha1(key) mapped to [0, 1) is below
`heldout_fraction` (so for file sources the split is by file, deterministic on every machine).
`max_documents` keeps the first N documents of the chosen split, in source order.

Empty files, binary files (a NUL byte in the first 8 KiB) and files that are not valid UTF-8 are skipped
and counted in `SkipStats`, never a crash. A missing path raises FileNotFoundError naming it; a source
that yields no document raises `EmptyCorpusError` with the skip summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from a3jax import fs

STDLIB_EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                                 "__pycache__"})
# A prepared directory (written by a3jax.data.prepare, read here): its metadata file and format.
PREPARED_META = "a3jax_data.json"
PREPARED_FORMAT = "a3jax-arrayrecord"
PREPARED_VERSION = 1
SPLITS = ("train", "heldout", "all")


class EmptyCorpusError(ValueError):
    """The source produced no document for the requested split."""


@dataclasses.dataclass
class SkipStats:
    """Counts of skipped inputs by reason, with a few example names for the summary."""

    counts: dict = dataclasses.field(default_factory=dict)
    examples: dict = dataclasses.field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(name)

    def merge(self, other: "SkipStats") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, 3 - len(ex))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = []
        for reason in sorted(self.counts):
            ex = ", ".join(self.examples.get(reason, []))
            parts.append(f"{self.counts[reason]} {reason} (e.g. {ex})")
        return "skipped " + "; ".join(parts)


# ----------------------------------------------------------------------------- split


def heldout_score(key: str) -> float:
    """Deterministic value in [0, 1) for a document key (sha1, same on every machine and run)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


def in_split(key: str, split: str, heldout_fraction: float) -> bool:
    if split == "all":
        return True
    held = heldout_score(key) < heldout_fraction
    return held if split == "heldout" else not held


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"data.split: {split!r} is not one of {SPLITS}")


# ----------------------------------------------------------------------------- files


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def file_kind(path: str) -> str:
    p = path.lower()
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def is_prepared_dir(spec: str) -> bool:
    return fs.isdir(spec) and fs.isfile(fs.join(spec, PREPARED_META))


def resolve_files(spec: str) -> tuple[str, list[str]]:
    """Source spec (local or gs://) -> (root used for relative keys, sorted list of files). Raises on a
    missing path."""
    if spec == "stdlib":
        root = stdlib_root()
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Python stdlib source directory not found: {root}")
        return root, fs.find(root, STDLIB_EXCLUDE_DIRS, ".py")
    spec = spec if fs.is_gcs(spec) else os.path.expanduser(spec)
    if any(c in spec for c in "*?["):
        files = fs.glob(spec)
        if not files:
            raise FileNotFoundError(f"no files match the source glob {spec!r}")
        base = spec
        for i, c in enumerate(spec):
            if c in "*?[":
                base = fs.dirname(spec[:i])
                break
        return base or ".", files
    if not fs.exists(spec):
        raise FileNotFoundError(f"data source not found: {spec}")
    if fs.isdir(spec):
        return spec, fs.find(spec)
    return fs.dirname(spec) or ".", [spec]


def _decode_file(path: str, name: str, skips: SkipStats) -> Optional[str]:
    raw = fs.read_bytes(path)
    if not raw.strip():
        skips.add("empty", name)
        return None
    if b"\x00" in raw[:8192]:
        skips.add("binary", name)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("undecodable", name)
        return None


def read_file_documents(path: str, key: str, text_field: str = "text",
                        keep=None) -> tuple[list[tuple[str, str]], SkipStats]:
    """All documents of one file as (key, text) pairs, plus what was skipped.

    `keep(key) -> bool` filters documents before decoding/tokenizing (used for the split).
    """
    skips = SkipStats()
    kind = file_kind(path)
    docs: list[tuple[str, str]] = []
    if kind == "text":
        if keep is not None and not keep(key):
            return docs, skips
        text = _decode_file(path, key, skips)
        if text is not None:
            docs.append((key, text))
    elif kind == "jsonl":
        text_all = _decode_file(path, key, skips)
        if text_all is None:
            return docs, skips
        for ln, line in enumerate(text_all.splitlines(), 1):
            if not line.strip():
                continue
            k = f"{key}:{ln}"
            if keep is not None and not keep(k):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skips.add("bad_json_line", k)
                continue
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                skips.add(f"no_text_field_{text_field}", k)
            elif not text.strip():
                skips.add("empty", k)
            else:
                docs.append((k, text))
    elif kind == "parquet":
        # Imported here: only Parquet sources need pyarrow, a 50 MB wheel that a GPU host without
        # network may lack (bench/device_check.sh carries what it needs in 64 MiB).
        import pyarrow as pa
        import pyarrow.parquet as pq

        # gs://: the file's bytes in memory (pyarrow reads local files itself, memory-mapped)
        src = pa.BufferReader(fs.read_bytes(path)) if fs.is_gcs(path) else path
        try:
            schema = pq.read_schema(src)
        except Exception:
            skips.add("unreadable_parquet", key)
            return docs, skips
        if text_field not in schema.names:
            raise KeyError(f"{path}: no column {text_field!r} (columns: {schema.names}); "
                           f"set data.text_field")
        col = pq.read_table(src, columns=[text_field]).column(text_field).to_pylist()
        for row, text in enumerate(col):
            k = f"{key}:{row}"
            if keep is not None and not keep(k):
                continue
            if not isinstance(text, str) or not text.strip():
                skips.add("empty", k)
            else:
                docs.append((k, text))
    return docs, skips


def iter_documents(spec: str, text_field: str = "text", split: str = "all",
                   heldout_fraction: float = 0.0,
                   skips: Optional[SkipStats] = None) -> Iterator[tuple[str, str]]:
    """(key, text) pairs of a text source in deterministic order, filtered to `split`."""
    check_split(split)
    root, files = resolve_files(spec)
    skips = skips if skips is not None else SkipStats()
    keep = (lambda k: in_split(k, split, heldout_fraction)) if split != "all" else None
    for path in files:
        key = fs.relpath(path, root)
        docs, s = read_file_documents(path, key, text_field, keep)
        skips.merge(s)
        yield from docs


# ----------------------------------------------------------------------------- corpora


class Corpus:
    """Tokenized documents held in memory as one flat array plus offsets."""

    def __init__(self, docs: Sequence[np.ndarray], keys: Sequence[str], vocab_size: int,
                 skips: Optional[SkipStats] = None, name: str = ""):
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.flat = (np.concatenate([np.asarray(d) for d in docs]).astype(dtype) if len(docs)
                     else np.zeros(0, dtype))
        self.keys = list(keys)
        self.skips = skips or SkipStats()
        self.name = name

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]].astype(np.int32)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def read_meta(directory: str) -> dict:
    """The metadata of a prepared directory; raises if it is not one (or of another format)."""
    path = fs.join(directory, PREPARED_META)
    if not fs.isfile(path):
        raise FileNotFoundError(f"not a prepared data directory (no {PREPARED_META}): {directory}")
    meta = json.loads(fs.read_text(path))
    if meta.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r} (expected {PREPARED_FORMAT!r})")
    return meta


class ArrayRecordCorpus:
    """Pre-tokenized documents in ArrayRecord shards written by `prepare`, read lazily by index.

    ArrayRecord's reader opens local files only, so a gs:// directory is first copied to the host's
    cache (a3jax.fs.local_copy: once per host, skipped when the cached files have the right sizes)."""

    def __init__(self, directory: str, split: str = "all", heldout_fraction: float = 0.0,
                 max_documents: int = 0):
        check_split(split)
        self.name = directory
        self.meta = read_meta(directory)
        directory = self.directory = fs.local_copy(directory)
        index = np.load(os.path.join(directory, self.meta["index"]), allow_pickle=False)
        keys = [str(k) for k in index["keys"]]
        lengths = index["lengths"].astype(np.int64)
        sel = [i for i, k in enumerate(keys) if in_split(k, split, heldout_fraction)]
        if max_documents:
            sel = sel[:max_documents]
        self.records = np.asarray(sel, dtype=np.int64)
        self.keys = [keys[i] for i in sel]
        self._lengths = lengths[self.records] if len(sel) else np.zeros(0, np.int64)
        self.dtype = np.dtype(self.meta["dtype"])
        self.paths = [os.path.join(directory, s["file"]) for s in self.meta["shards"]]
        self.skips = SkipStats(dict(self.meta.get("skipped", {})), {})
        self._source = None

    def _src(self):
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):  # the reader is reopened lazily in worker processes
        d = dict(self.__dict__)
        d["_source"] = None
        return d

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def doc(self, i: int) -> np.ndarray:
        raw = self._src()[int(self.records[i])]
        return np.frombuffer(raw, dtype=self.dtype).astype(np.int32)

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum())


def tokenize_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tokenizer, "encode_batch_np"):
        return tokenizer.encode_batch_np(texts)
    return [tokenizer.encode_np(t) for t in texts]


def load_corpus(spec: str, tokenizer, split: str = "train", heldout_fraction: float = 0.05,
                max_documents: int = 0, text_field: str = "text"):
    """Source spec -> tokenized corpus (`Corpus` in memory, or `ArrayRecordCorpus` for prepared data)."""
    check_split(split)
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction}")
    local_spec = spec if fs.is_gcs(spec) else os.path.expanduser(spec)
    if spec != "stdlib" and not any(c in spec for c in "*?[") and is_prepared_dir(local_spec):
        corpus = ArrayRecordCorpus(local_spec, split, heldout_fraction, max_documents)
        meta = corpus.meta
        for key in ("bos_id", "eos_id", "pad_id", "vocab_size"):
            if meta.get(key) != getattr(tokenizer, key):
                raise ValueError(
                    f"{fs.join(spec, PREPARED_META)}: prepared with tokenizer "
                    f"{meta.get('tokenizer')!r} ({key}={meta.get(key)}), but data.tokenizer="
                    f"{tokenizer.spec!r} has {key}={getattr(tokenizer, key)}")
    else:
        skips = SkipStats()
        keys, texts = [], []
        for key, text in iter_documents(spec, text_field, split, heldout_fraction, skips):
            keys.append(key)
            texts.append(text)
            if max_documents and len(keys) >= max_documents:
                break
        docs = tokenize_texts(tokenizer, texts)
        corpus = Corpus(docs, keys, tokenizer.vocab_size, skips, spec)
    if len(corpus) == 0:
        raise EmptyCorpusError(
            f"data source {spec!r} has no documents in split {split!r} "
            f"(heldout_fraction={heldout_fraction}); {corpus.skips.summary()}")
    return corpus
