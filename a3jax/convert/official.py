"""The reference PyTorch A3 code's checkpoints <-> a3jax (github.com/PKU-ML/Any-order-Any-subset-AR).

Its directory holds a HF-style LLaMA config.json and a state dict with the HF LLaMA names plus
`model.query_embed` of shape [1, 1, hidden]: `model.embed_tokens.weight`, `model.layers.N.…`,
`model.norm.weight`, `lm_head.weight` (absent when tied), as `.safetensors` or `.bin`.

Its decoder layer is v = post_attention_layernorm(h + attn(input_layernorm(h))); h' = v + mlp(v),
which is a3jax's `block: official` with attn_norm = input_layernorm and mlp_norm =
post_attention_layernorm, so the conversion is the same rename + transpose as for HF LLaMA.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from a3jax import fs
from a3jax.config import ModelConfig
from a3jax.convert.hf import (ConversionError, TensorReader, config_from_hf, config_to_hf, copy_tokenizer_files,
                              hf_tensors_of, load_params_lazy, read_config_json, resolve_dtype, write_safetensors)
from a3jax.model import numpy_dtype


def from_official(model_dir: str, dtype: Optional[str] = None, progress: bool = False, **config_overrides):
    """(cfg, params) from a reference-code checkpoint directory (local or gs://); cfg.block == "official"."""
    if fs.is_gcs(model_dir):
        model_dir = fs.local_copy(model_dir)  # the readers need local files
    hf, path = read_config_json(model_dir)
    overrides = {"block": "official", "query_init": "normal", **config_overrides}
    cfg = config_from_hf(hf, path, **overrides)
    reader = TensorReader(model_dir)
    return load_params_lazy(cfg, reader, resolve_dtype(dtype), official=True, progress=progress)


def _numpy_to_torch(w: np.ndarray):
    import torch  # deferred: torch is only needed for .bin checkpoints

    if w.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(w).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(w))


def to_official(cfg: ModelConfig, params, out_dir: str, fmt: str = "safetensors", dtype: Optional[str] = None,
                max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Optional[str] = None) -> str:
    """Writes the reference code's format: config.json + model.safetensors (or shards + index), or
    pytorch_model.bin with fmt="bin". Only for block=official (the reference code runs that block)."""
    if cfg.block != "official":
        raise ConversionError(f"block={cfg.block!r}: the reference A3 code runs the `official` post-norm block, so "
                              f"this model would compute different logits there; export it with to_hf / "
                              f"`a3jax convert a3-to-hf` instead")
    if fmt not in ("safetensors", "bin"):
        raise ConversionError(f"format {fmt!r} is not one of safetensors, bin")
    dtype = resolve_dtype(dtype) or cfg.param_dtype
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    if fmt == "safetensors":
        write_safetensors(cfg, params, out_dir, official=True, max_shard_bytes=max_shard_bytes, dtype=dtype)
    else:
        try:
            import torch  # deferred: torch is only needed for .bin checkpoints
        except ImportError as e:
            raise ConversionError("writing .bin checkpoints needs torch; use fmt='safetensors'") from e
        npdt = numpy_dtype(dtype)
        sd = {k: _numpy_to_torch(t().astype(npdt, copy=False)) for k, t in hf_tensors_of(cfg, params, official=True)}
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
