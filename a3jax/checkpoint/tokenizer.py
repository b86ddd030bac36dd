"""The tokenizer travels with the params. Every params checkpoint the project writes (`a3jax convert`,
`a3jax export`, a run's `final/`) holds its model's tokenizer files beside params/ and model.yaml;
a model on the byte tokenizer has none. `--tokenizer auto` means the checkpoint's own: `tokenizer_spec`.
"""
from __future__ import annotations

import os

from a3jax import fs
from a3jax.checkpoint.run import is_run_dir, resolve_step, run_config_dict

# What a HF model directory may hold for its tokenizer; a3jax.data.load_tokenizer reads tokenizer.json,
# special_tokens_map.json and tokenizer_config.json, the rest travels for transformers' sake.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")
BYTE_SPECS = ("byte", "bytes", "")


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    """The tokenizer files of src_dir that exist, copied to out_dir (either may be gs://)."""
    copied = []
    for name in TOKENIZER_FILES:
        p = fs.join(src_dir, name)
        if fs.isfile(p):
            fs.copy_file(p, fs.join(out_dir, name))
            copied.append(name)
    return copied


def copy_tokenizer(spec: str, out_dir: str) -> list[str]:
    """The files of tokenizer `spec` (what a3jax.data.load_tokenizer takes: byte, a tokenizer.json or a
    directory holding one) copied into out_dir as tokenizer.json and the files beside it; byte: none."""
    if spec in BYTE_SPECS:
        return []
    if not fs.is_gcs(spec):
        spec = os.path.expanduser(spec)
    is_file = spec.endswith(".json")
    src_dir = fs.dirname(spec) if is_file else spec
    file = spec if is_file else fs.join(spec, "tokenizer.json")
    if not fs.isfile(file):
        raise FileNotFoundError(f"tokenizer {spec}: {file} not found")
    fs.copy_file(file, fs.join(out_dir, "tokenizer.json"))
    return ["tokenizer.json"] + [n for n in copy_tokenizer_files(src_dir, out_dir) if n != "tokenizer.json"]


def run_tokenizer(run_dir: str, step=None) -> str:
    """The tokenizer a run trained with (data.tokenizer of the config checkpoint `step` was saved with)."""
    return str(run_config_dict(run_dir, resolve_step(run_dir, step)).get("data", {}).get("tokenizer", "byte"))


def tokenizer_spec(ckpt: str) -> str:
    """What `--tokenizer auto` loads for `ckpt`: a params checkpoint's own tokenizer files, a run
    directory's training tokenizer, else the byte tokenizer."""
    if fs.isfile(fs.join(ckpt, "tokenizer.json")):
        return ckpt
    if is_run_dir(ckpt):
        return run_tokenizer(ckpt)
    return "byte"
