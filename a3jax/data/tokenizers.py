"""Tokenizers: a built-in byte-level tokenizer and a wrapper around HF `tokenizers` (tokenizer.json).

Both expose the same small surface the pipeline, the decoder and the CLI use:

    tok.encode(text) -> list[int]           # no special tokens added
    tok.encode_np(text) -> np.ndarray        # same, as an int32 array (fast path for the pipeline)
    tok.decode(ids) -> str                   # undecodable bytes become U+FFFD (errors="replace")
    tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id (None when the tokenizer has none), tok.vocab_size
    tok.spec                                 # the string `load_tokenizer` accepts to rebuild it
    tok.add_bos                              # whether the model was trained with BOS before a text

`load_tokenizer("byte")` gives the byte tokenizer (ids 0..255 = bytes, BOS 256, EOS 257, PAD 258,
MASK 259, vocab 260: the defaults of `ModelConfig`). Any other spec is a path to a tokenizer.json or to
a model directory containing one; BOS/EOS/PAD are read from tokenizer_config.json /
special_tokens_map.json / config.json next to it. A missing BOS or EOS raises `TokenizerError` naming
the files that were searched. A missing PAD falls back to EOS (padding is never attended to and never
in the loss, so any id works).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer

from a3jax import fs


class TokenizerError(ValueError):
    """A tokenizer file is missing or lacks a special token the pipeline needs."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS=256, EOS=257, PAD=258, MASK=259 (vocab 260)."""

    spec = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    mask_id = 259
    vocab_size = 260
    add_bos = True

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_np(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _token_content(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json, with special ids from the files next to it."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        if os.path.isdir(path):
            file = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"no tokenizer.json in model directory {path}")
        else:
            file = path
        self.spec = path
        self.file = file
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: cannot load tokenizer: {e}") from e
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        d = os.path.dirname(os.path.abspath(file))
        searched = [file]
        names: dict[str, str] = {}
        ids: dict[str, int] = {}
        self.add_bos = True  # tokenizer_config.json's add_bos_token (false e.g. for SmolLM2)
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(d, fname)
            if os.path.isfile(p):
                searched.append(p)
                with open(p) as f:
                    try:
                        cfg = json.load(f)
                    except json.JSONDecodeError as e:
                        raise TokenizerError(f"{p}: not valid JSON: {e}") from e
                if isinstance(cfg.get("add_bos_token"), bool):
                    self.add_bos = cfg["add_bos_token"]
                for key in ("bos", "eos", "pad", "mask"):
                    c = _token_content(cfg.get(f"{key}_token"))
                    if c is not None:
                        names[key] = c  # tokenizer_config.json (read last) wins
        p = os.path.join(d, "config.json")
        if os.path.isfile(p):
            searched.append(p)
            with open(p) as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError:
                    cfg = {}
            for key in ("bos", "eos", "pad"):
                v = cfg.get(f"{key}_token_id")
                if isinstance(v, list) and v:
                    v = v[0]
                if isinstance(v, int) and not isinstance(v, bool):
                    ids[key] = v
        resolved: dict[str, Optional[int]] = {}
        for key in ("bos", "eos", "pad", "mask"):
            tid = None
            if key in names:
                tid = self._tok.token_to_id(names[key])
                if tid is None:
                    raise TokenizerError(f"{file}: special token {names[key]!r} ({key}_token in "
                                         f"{', '.join(searched[1:])}) is not in the vocabulary")
            if tid is None:
                tid = ids.get(key)
            resolved[key] = tid
        for key in ("bos", "eos"):
            if resolved[key] is None:
                raise TokenizerError(f"tokenizer {file}: no {key.upper()} token found (looked for "
                                     f"{key}_token / {key}_token_id in {', '.join(searched)}); add a "
                                     f"tokenizer_config.json with \"{key}_token\"")
        self.bos_id = int(resolved["bos"])
        self.eos_id = int(resolved["eos"])
        self.pad_id = int(resolved["pad"]) if resolved["pad"] is not None else self.eos_id
        self.mask_id = int(resolved["mask"]) if resolved["mask"] is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_np(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch_np(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.file!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


# The files HFTokenizer reads from a model directory (what a gs:// tokenizer copies to the local cache).
TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json", "config.json")


def load_tokenizer(spec: str):
    """`byte` -> ByteTokenizer; otherwise a path (local or gs://) to tokenizer.json or a directory
    containing one."""
    if spec in ("byte", "bytes", ""):
        return ByteTokenizer()
    if fs.is_gcs(spec):
        # the tokenizers library reads local files only: its few files go to the local cache first
        is_file = spec.endswith(".json")
        file = spec if is_file else fs.join(spec, "tokenizer.json")
        if not fs.isfile(file):
            raise FileNotFoundError(f"tokenizer not found: {file}")
        d = fs.local_copy(fs.dirname(file), names=TOKENIZER_FILES + (fs.basename(file),))
        tok = HFTokenizer(os.path.join(d, fs.basename(file)) if is_file else d)
        tok.spec = spec
        return tok
    return HFTokenizer(os.path.expanduser(spec))
