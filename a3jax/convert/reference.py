"""The reference PyTorch A3 code's checkpoints <-> a3jax (github.com/PKU-ML/Any-order-Any-subset-AR).

Its directory holds a HF-style LLaMA config.json and a state dict with the HF LLaMA names plus
`model.query_embed` of shape [1, 1, hidden]: `model.embed_tokens.weight`, `model.layers.N.…`,
`model.norm.weight`, `lm_head.weight` (absent when tied), as `.safetensors` or `.bin`. Its training
script saves with HF Trainer: `checkpoint-N/` folders every save_steps (weights beside optimizer.pt,
scheduler.pt, rng_state.pth, training_args.bin), and the final weights at the top of the output folder.

Its decoder layer is v = post_attention_layernorm(h + attn(input_layernorm(h))); h' = v + mlp(v),
which is a3jax's `block: reference` with attn_norm = input_layernorm and mlp_norm =
post_attention_layernorm, so the conversion is the same rename + transpose as for HF LLaMA.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Callable, Optional

import numpy as np

from a3jax import fs
from a3jax.checkpoint.tokenizer import copy_tokenizer_files
from a3jax.config import ModelConfig
from a3jax.convert.hf import (ConversionError, NoWeightsError, TensorReader, config_from_hf, config_to_hf,
                              find_weight_files, hf_tensors_of, load_params_lazy, no_weights_message,
                              read_config_json, resolve_dtype, write_safetensors)
from a3jax.model import numpy_dtype, query_embed_init


CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # HF Trainer's save_steps folders (transformers' PREFIX_CHECKPOINT_DIR)


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _has_weights(d: str) -> bool:
    try:
        find_weight_files(d)  # a broken index or shard is its own error, raised here
    except NoWeightsError:
        return False
    return True


def trainer_checkpoints(d: str) -> list[tuple[int, str]]:
    """(N, path) of the `checkpoint-N` folders of a HF Trainer output directory, by N."""
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d)
             if (m := CHECKPOINT_DIR.match(n)) and os.path.isdir(os.path.join(d, n))]
    return sorted(found)


def resolve_checkpoint_dir(path: str, log: Callable[[str], None] = _log_stderr) -> str:
    """The directory holding the weights of a reference-code run, as HF Trainer saves it.

    * weights at the top (model.safetensors, sharded safetensors + index, pytorch_model.bin, sharded
      .bin + index): that directory (Trainer's final `save_model`, or a `checkpoint-N` folder given
      directly), whatever checkpoint-N folders sit beside them;
    * otherwise the `checkpoint-N` folder with the highest N, as Trainer's own `get_last_checkpoint`
      (resume_from_checkpoint=True) picks it, said in the log; if that folder has no weights (a save cut
      short) it is an error naming it rather than a silent fall back to an older step;
    * neither: an error naming the directory and what it holds (optimizer.pt, scheduler.pt,
      rng_state.pth, training_args.bin are training state, never read as weights)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory (a reference-code checkpoint is a folder with config.json "
                              f"and the weights)")
    ckpts = trainer_checkpoints(path)
    if _has_weights(path):
        if ckpts:
            log(f"{path}: using the weights at its top (the run's final save); ignoring "
                f"{', '.join(os.path.basename(p) for _, p in ckpts)}")
        return path
    if not ckpts:
        find_weight_files(path)  # raises: no weights, naming what the folder holds
    n, newest = ckpts[-1]
    if not _has_weights(newest):
        raise ConversionError(f"{path}: no weights at its top, and its newest Trainer checkpoint has none either: "
                              f"{no_weights_message(newest, sorted(os.listdir(newest)))}. Pass one of "
                              f"{', '.join(p for _, p in ckpts[:-1]) or 'no other checkpoint'} explicitly")
    others = ", ".join(os.path.basename(p) for _, p in ckpts[:-1])
    log(f"{path}: no weights at its top; using checkpoint-{n}, the newest Trainer checkpoint"
        + (f" (also there: {others})" if others else ""))
    return newest


def from_reference(model_dir: str, dtype: Optional[str] = None, progress: bool = False, from_llama: bool = False,
                  log: Callable[[str], None] = _log_stderr, **config_overrides):
    """(cfg, params) from a reference-code checkpoint directory (local or gs://); cfg.block == "reference".

    `model_dir` may be a HF Trainer output directory or one of its `checkpoint-N` folders
    (resolve_checkpoint_dir). With `from_llama`, a plain HF LLaMA directory (no `model.query_embed`) is
    read the way the reference's `from_pretrained` reads one: the LLaMA weights in the reference block and
    the query vector per cfg.query_init (default `normal`: N(0, 1), as its torch.randn). Without it a
    missing query vector is an error (a reference checkpoint always has one)."""
    if fs.is_gcs(model_dir):
        model_dir = fs.local_copy(model_dir)  # the readers need local files
    model_dir = resolve_checkpoint_dir(model_dir, log)
    hf, path = read_config_json(model_dir)
    overrides = {"block": "reference", "query_init": "normal", **config_overrides}
    cfg = config_from_hf(hf, path, **overrides)
    reader = TensorReader(model_dir)
    has_query = "model.query_embed" in reader.shapes
    try:
        cfg, params = load_params_lazy(cfg, reader, resolve_dtype(dtype), reference=has_query or not from_llama,
                                       progress=progress)
    except ConversionError as e:
        if has_query:
            raise
        raise ConversionError(f"{e}\n  (no query vector: for a plain HF LLaMA pass from_llama=True / --from-llama, "
                              f"which starts it per query_init as the reference's from_pretrained does)") from e
    if not has_query:
        log(f"{model_dir}: a plain LLaMA (no model.query_embed): query vector from query_init={cfg.query_init!r}")
        # a causal LM until adapted, unless the caller says otherwise
        cfg = dataclasses.replace(cfg, objective=config_overrides.get("objective", "ar"))
        params["query_embed"] = np.asarray(query_embed_init(cfg, params["embed"])).astype(params["embed"].dtype)
    return cfg, params


def _numpy_to_torch(w: np.ndarray):
    import torch  # deferred: torch is only needed for .bin checkpoints

    if w.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(w).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(w))


def to_reference(cfg: ModelConfig, params, out_dir: str, fmt: str = "safetensors", dtype: Optional[str] = None,
                max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Optional[str] = None) -> str:
    """Writes the reference code's format: config.json + model.safetensors (or shards + index), or
    pytorch_model.bin with fmt="bin". Only for block=reference (the reference code runs that block)."""
    if cfg.block != "reference":
        raise ConversionError(f"block={cfg.block!r}: the reference A3 code runs the `reference` post-norm block, so "
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
        write_safetensors(cfg, params, out_dir, reference=True, max_shard_bytes=max_shard_bytes, dtype=dtype)
    else:
        try:
            import torch  # deferred: torch is only needed for .bin checkpoints
        except ImportError as e:
            raise ConversionError("writing .bin checkpoints needs torch; use fmt='safetensors'") from e
        npdt = numpy_dtype(dtype)
        sd = {k: _numpy_to_torch(t().astype(npdt, copy=False)) for k, t in hf_tensors_of(cfg, params, reference=True)}
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
