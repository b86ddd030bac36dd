"""HF LLaMA directory -> a3jax (config.json + safetensors). Pure numpy/safetensors: no torch.

HF stores torch Linear weights as [out, in]; a3jax keeps x @ W layouts with heads split out:
q_proj [H*D, E] -> wq [E, H, D]; o_proj [E, H*D] -> wo [H, D, E]; gate/up [M, E] -> [E, M];
down [E, M] -> [M, E]. RoPE is the same rotate-half layout, so no permutation is needed.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from a3jax.config import ConfigError, ModelConfig


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names every offending key or file."""


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """Reads a HF LlamaConfig dict (transformers 4 or 5 layout) into a ModelConfig."""
    mt = hf.get("model_type", "llama")
    if mt not in ("llama",):
        raise ConversionError(f"{where}: model_type {mt!r} is not a LLaMA model")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported (LLaMA has no biases)")
    if hf.get("sliding_window"):
        raise ConversionError(f"{where}: sliding_window is not supported")
    if hf.get("num_local_experts") or hf.get("num_experts"):
        raise ConversionError(f"{where}: mixture-of-experts models are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not supported (LLaMA uses silu)")
    # transformers 5: rope_parameters {rope_theta, rope_type, ...}; 4: rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        rope = {**hf["rope_scaling"], **rope}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rtype not in ("default", "linear", "llama3"):
        raise ConversionError(f"{where}: rope type {rtype!r} is not supported (default, linear, llama3)")
    heads = hf["num_attention_heads"]

    def tok(name):
        v = hf.get(name)
        if isinstance(v, list):
            v = v[0]
        return -1 if v is None else int(v)

    kwargs = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(theta), rope_type=rtype, rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("pad_token_id"),
    )
    if kwargs["head_dim"] * heads == kwargs["hidden_size"]:
        kwargs["head_dim"] = 0
    kwargs.update(overrides)
    cfg = ModelConfig(**kwargs)
    try:
        cfg.validate(where)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    return cfg


def hf_layer_keys(cfg: ModelConfig, i: int, prefix: str = "model.") -> dict:
    """a3jax layer param name -> HF key for layer i."""
    p = f"{prefix}layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
        "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
        "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
        "w_gate": p + "mlp.gate_proj.weight", "w_up": p + "mlp.up_proj.weight",
        "w_down": p + "mlp.down_proj.weight",
    }


def hf_to_layer(cfg: ModelConfig, name: str, w: np.ndarray) -> np.ndarray:
    """One HF tensor -> the a3jax layout of `name` (a per-layer slice)."""
    E, D = cfg.hidden_size, cfg.head_size
    if name == "wq":
        return w.T.reshape(E, cfg.num_heads, D)
    if name in ("wk", "wv"):
        return w.T.reshape(E, cfg.num_kv_heads, D)
    if name == "wo":
        return w.T.reshape(cfg.num_heads, D, E)
    if name in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def layer_to_hf(cfg: ModelConfig, name: str, w: np.ndarray) -> np.ndarray:
    """Inverse of hf_to_layer."""
    if name in ("wq", "wk", "wv"):
        return w.reshape(cfg.hidden_size, -1).T
    if name == "wo":
        return w.reshape(-1, cfg.hidden_size).T
    if name in ("w_gate", "w_up", "w_down"):
        return w.T
    return w


def safetensors_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return sorted({os.path.join(hf_dir, v) for v in wm.values()})
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    return []


def read_hf_tensors(hf_dir: str) -> dict:
    """All tensors of a HF directory as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    from safetensors.numpy import load_file

    files = safetensors_files(hf_dir)
    if not files:
        raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json found")
    out = {}
    for path in files:
        if not os.path.exists(path):
            raise ConversionError(f"{path}: listed in the index but missing")
        try:
            out.update(load_file(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from e
    return out


def params_from_hf_tensors(cfg: ModelConfig, tensors: dict, where: str, dtype=None) -> dict:
    """Builds the a3jax params tree; every missing/unexpected/mis-shaped key is reported together."""
    from a3jax.model.transformer import param_shapes

    shapes = param_shapes(cfg)
    problems, used = [], set()

    def take(key, want_shape):
        if key not in tensors:
            problems.append(f"missing {key} (expected shape {tuple(want_shape)})")
            return None
        used.add(key)
        w = np.asarray(tensors[key])
        if tuple(w.shape) != tuple(want_shape):
            problems.append(f"{key}: shape {tuple(w.shape)} in the checkpoint, expected {tuple(want_shape)}")
            return None
        return w if dtype is None else w.astype(dtype)

    V, E, M = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    hf_shapes = {"attn_norm": (E,), "mlp_norm": (E,), "wq": (H * D, E), "wk": (K * D, E), "wv": (K * D, E),
                 "wo": (E, H * D), "w_gate": (M, E), "w_up": (M, E), "w_down": (E, M)}
    params = {"embed": take("model.embed_tokens.weight", (V, E)),
              "final_norm": take("model.norm.weight", (E,))}
    if not cfg.tie_word_embeddings:
        w = take("lm_head.weight", (V, E))
        params["lm_head"] = None if w is None else w.T
    layers = {name: [] for name in shapes["layers"]}
    for i in range(cfg.num_layers):
        for name, key in hf_layer_keys(cfg, i).items():
            w = take(key, hf_shapes[name])
            layers[name].append(None if w is None else hf_to_layer(cfg, name, w))
    extra = sorted(k for k in tensors if k not in used and not k.endswith("rotary_emb.inv_freq")
                   and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    problems += [f"unexpected {k} with shape {tuple(np.shape(tensors[k]))}" for k in extra]
    if problems:
        raise ConversionError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    params["layers"] = {n: np.stack(ws) for n, ws in layers.items()}
    return params


def from_hf(hf_dir: str, **config_overrides):
    """(cfg, params) from a HF LLaMA directory; params are numpy arrays ready for `forward`.
    The query vector is initialised per cfg.query_init (default: the mean token embedding)."""
    import jax

    from a3jax.model.transformer import query_embed_init

    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: not found (is {hf_dir} a HF model directory?)")
    with open(path) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, path, **config_overrides)
    params = params_from_hf_tensors(cfg, read_hf_tensors(hf_dir), hf_dir)
    cfg = dataclasses.replace(cfg, param_dtype=_dtype_name(params["embed"].dtype))
    params["query_embed"] = np.asarray(query_embed_init(cfg, params["embed"], jax.random.PRNGKey(0)))
    return cfg, params


def _dtype_name(dt) -> str:
    name = np.dtype(dt).name
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(name, "float32")
