"""RUN_DIR/final/: what a finished run hands on, a params checkpoint (a3jax.checkpoint.save_params: the
format of `a3jax convert` output, `--ckpt` and `model.init_from`) with the tokenizer files beside it."""
from __future__ import annotations

import os

import jax

from a3jax import fs
from a3jax.checkpoint import save_params
from a3jax.config import Config

FINAL_DIR = "final"
# The files of a HF tokenizer that a3jax.data.load_tokenizer reads from a directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(spec: str, out: str) -> list:
    """Copies the tokenizer files of data.tokenizer `spec` (a tokenizer.json or a directory holding one;
    local or gs://) into `out`; the byte tokenizer has no files. Returns the names copied."""
    if spec in ("", "byte", "bytes"):
        return []
    if not fs.is_gcs(spec):
        spec = os.path.expanduser(spec)
    src = fs.dirname(spec) if spec.endswith(".json") else spec
    copied = []
    for name in TOKENIZER_FILES:
        path = spec if (spec.endswith(".json") and name == "tokenizer.json") else fs.join(src, name)
        if fs.isfile(path):
            fs.copy_file(path, fs.join(out, name))
            copied.append(name)
    return copied


def write_final(cfg: Config, params, run_dir: str) -> str:
    """Writes RUN_DIR/final (params + model.yaml + tokenizer files), replacing an older one. Every process
    calls it (Orbax writes from all of them); process 0 copies the tokenizer. Returns its path."""
    out = fs.join(run_dir, FINAL_DIR)
    save_params(out, cfg.model, params, force=True)
    if jax.process_index() == 0:
        copy_tokenizer(cfg.data.tokenizer, out)
    return out
