"""HF LLaMA directory <-> a3jax. numpy + safetensors; torch only for `.bin` files, imported lazily.

HF stores torch Linear weights as [out, in]; a3jax keeps x @ W layouts with heads split out:
q_proj [H*D, E] -> wq [E, H, D]; o_proj [E, H*D] -> wo [H, D, E]; gate/up [M, E] -> [E, M];
down [E, M] -> [M, E]. RoPE is the same rotate-half layout, so no permutation is needed.

Reading is lazy: the tensor headers of every file are read first (names, shapes, dtypes), every
missing / unexpected / mis-shaped key is reported together, then the params are preallocated once in
the target dtype and filled tensor by tensor, file by file. Peak host memory is one copy of the
weights plus one tensor (plus, for `.bin`, the pages of the file being read).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Iterable, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from a3jax import fs, objectives
from a3jax.checkpoint.tokenizer import copy_tokenizer_files
from a3jax.config import ConfigError, ModelConfig
from a3jax.model import numpy_dtype, param_shapes, query_embed_init


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names every offending key or file."""


QUERY_EMBED_FILE = "query_embed.safetensors"


class NoWeightsError(ConversionError):
    """A model directory without weight files (its message says what the directory holds)."""
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                 "f32": "float32", "fp16": "float16", "float16": "float16", "f16": "float16"}


# ----------------------------------------------------------------------------- config


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
            v = v[0] if v else None
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
    return converted_config(kwargs, overrides, where)


def converted_config(kwargs: dict, overrides: dict, where: str) -> ModelConfig:
    """The ModelConfig of a converted checkpoint's fields plus the user's overrides, validated; a bad
    value is a ConversionError naming `where` (the file it came from)."""
    cfg = ModelConfig(**{**kwargs, **overrides})
    try:
        cfg.validate(where)
    except ConfigError as e:
        raise ConversionError(str(e)) from e
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    """A transformers LlamaConfig dict that transformers 5 (rope_parameters) and 4 (rope_theta +
    rope_scaling) both read."""
    rope_params = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_position}
    if scaling:
        rope_params.update(scaling)
    tok = lambda v: None if v < 0 else int(v)  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "pretraining_tp": 1, "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": tok(cfg.bos_token_id), "eos_token_id": tok(cfg.eos_token_id),
        "pad_token_id": tok(cfg.pad_token_id),
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_params,
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


def read_config_json(model_dir: str) -> tuple[dict, str]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConversionError(f"{model_dir}: not a directory")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: not found (is {model_dir} a HF model directory?)")
    try:
        with open(path) as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


# ----------------------------------------------------------------------------- key layout


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


def hf_layer_shapes(cfg: ModelConfig) -> dict:
    E, M = cfg.hidden_size, cfg.intermediate_size
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    return {"attn_norm": (E,), "mlp_norm": (E,), "wq": (H * D, E), "wk": (K * D, E), "wv": (K * D, E),
            "wo": (E, H * D), "w_gate": (M, E), "w_up": (M, E), "w_down": (E, M)}


def hf_to_layer(cfg: ModelConfig, name: str, w: np.ndarray) -> np.ndarray:
    """One HF tensor -> the a3jax layout of `name` (a per-layer slice); a view where possible."""
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


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: params[path] (or params[path][layer]) via `to_a3`."""
    path: tuple
    layer: Optional[int]
    shape: tuple  # shape in the checkpoint
    to_a3: Callable[[np.ndarray], np.ndarray]


def key_plan(cfg: ModelConfig, reference: bool = False) -> dict[str, Slot]:
    """Checkpoint key -> Slot, for HF LLaMA (reference=False) or the reference A3 code's state dict."""
    V, E = cfg.vocab_size, cfg.hidden_size
    ident = lambda w: w  # noqa: E731
    plan = {"model.embed_tokens.weight": Slot(("embed",), None, (V, E), ident),
            "model.norm.weight": Slot(("final_norm",), None, (E,), ident)}
    if not cfg.tie_word_embeddings:
        plan["lm_head.weight"] = Slot(("lm_head",), None, (V, E), lambda w: w.T)
    if reference:
        plan["model.query_embed"] = Slot(("query_embed",), None, (1, 1, E), lambda w: w.reshape(E))
    hf_shapes = hf_layer_shapes(cfg)
    for i in range(cfg.num_layers):
        for name, key in hf_layer_keys(cfg, i).items():
            plan[key] = Slot(("layers", name), i, hf_shapes[name],
                             (lambda w, n=name: hf_to_layer(cfg, n, w)))
    return plan


def _ignorable(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def check_tensor_shapes(cfg: ModelConfig, shapes: dict, where: str, reference: bool = False) -> None:
    """Every missing / unexpected / mis-shaped key, reported together in one ConversionError."""
    plan = key_plan(cfg, reference)
    problems = []
    for key, slot in plan.items():
        if key not in shapes:
            problems.append(f"missing {key} (expected shape {slot.shape})")
        elif tuple(shapes[key]) != slot.shape:
            problems.append(f"{key}: shape {tuple(shapes[key])} in the checkpoint, expected {slot.shape}")
    for key in sorted(shapes):
        if key in plan or _ignorable(key):
            continue
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            if tuple(shapes[key]) != (cfg.vocab_size, cfg.hidden_size):
                problems.append(f"{key}: shape {tuple(shapes[key])} in the checkpoint, expected "
                                f"{(cfg.vocab_size, cfg.hidden_size)} (tied to model.embed_tokens.weight)")
            continue
        problems.append(f"unexpected {key} with shape {tuple(shapes[key])}")
    if problems:
        raise ConversionError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- reading tensors


# What HF Trainer (and accelerate) write beside the weights of a checkpoint-N folder: optimizer and
# scheduler state, grad-scaler state, per-process RNG state, the pickled TrainingArguments. None holds
# model weights, though .pt/.pth/.bin names look like it.
TRAINING_STATE = re.compile(r"^(optimizer|scheduler|scaler)(_\d+)?\.(pt|bin|pth)$|^rng_state(_\d+)?\.pth$"
                            r"|^random_states_\d+\.pkl$|^training_args\.bin$")
WEIGHT_NAMES = "model.safetensors[.index.json] or pytorch_model.bin[.index.json] (+ shards)"


def is_training_state(name: str) -> bool:
    """True for a Trainer state file name (optimizer.pt, scheduler.pt, rng_state_3.pth, training_args.bin)."""
    return bool(TRAINING_STATE.match(name))


def no_weights_message(d: str, names: list[str]) -> str:
    """The error for a directory without model weights, saying what it does hold."""
    if not names:
        return f"{d}: no weights found ({WEIGHT_NAMES}); the directory is empty"
    state = [n for n in names if is_training_state(n)]
    msg = f"{d}: no weights found ({WEIGHT_NAMES}); it holds: {', '.join(names)}"
    if state:
        msg += f". {', '.join(state)}: HF Trainer training state (optimizer, scheduler, RNG, arguments), not weights"
    zero = [n for n in names if re.match(r"^global_step\d+$", n) and os.path.isdir(os.path.join(d, n))]
    if zero:
        msg += (f". {', '.join(zero)}/: a DeepSpeed ZeRO checkpoint: consolidate it first with the zero_to_fp32.py "
                f"script saved beside it (or save with stage3_gather_16bit_weights_on_model_save)")
    return msg


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # deferred: torch is only needed for .bin checkpoints

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return t.contiguous().numpy()


def _import_torch(path: str):
    try:
        import torch  # deferred: torch is only needed for .bin checkpoints
    except ImportError as e:
        raise ConversionError(f"{path}: reading PyTorch .bin checkpoints needs torch (pip install torch, the CPU "
                              f"wheel is enough), or convert the checkpoint to safetensors first") from e
    return torch


def find_weight_files(d: str, prefer: Optional[str] = None) -> tuple[list[str], str]:
    """(weight files, "safetensors" | "bin") of a model directory; ConversionError naming what it holds
    when there are none. Trainer state files (optimizer.pt, ...) are never taken for weights."""
    def from_index(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a valid index file ({e!r})") from e
        files = sorted({os.path.join(d, v) for v in wm.values()})
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise ConversionError(f"{index}: lists files that do not exist: {', '.join(missing)}")
        return files

    cands = {
        "safetensors": [("model.safetensors.index.json", None), ("model.safetensors", None)],
        "bin": [("pytorch_model.bin.index.json", None), ("pytorch_model.bin", None)],
    }
    order = ["safetensors", "bin"] if prefer != "bin" else ["bin", "safetensors"]
    for kind in order:
        for name, _ in cands[kind]:
            p = os.path.join(d, name)
            if os.path.exists(p):
                return (from_index(p) if name.endswith(".json") else [p]), kind
    # Other single-file names (e.g. a reference-code `model.bin` or `*.safetensors` without an index);
    # never a training-state file of HF Trainer / accelerate (optimizer.pt, rng_state.pth, ...).
    names = sorted(os.listdir(d))
    weights = [f for f in names if os.path.isfile(os.path.join(d, f)) and not is_training_state(f)]
    others = [f for f in weights if f.endswith(".safetensors") and f != QUERY_EMBED_FILE]
    if others:
        return [os.path.join(d, f) for f in others], "safetensors"
    others = [f for f in weights if f.endswith((".bin", ".pt", ".pth"))]
    if others:
        return [os.path.join(d, f) for f in others], "bin"
    raise NoWeightsError(no_weights_message(d, names))


class TensorReader:
    """Lazy view of the weights in a model directory: safetensors (single, or sharded with
    `model.safetensors.index.json`) or PyTorch `.bin` (single or sharded with `pytorch_model.bin.index.json`).

    `shapes` / `dtypes` come from the headers only; `read(key)` loads one tensor as numpy
    (bf16 as ml_dtypes.bfloat16); `iter_file(file)` yields the file's tensors one by one."""

    def __init__(self, model_dir: str, prefer: Optional[str] = None):
        self.dir = model_dir
        self.files, self.kind = find_weight_files(model_dir, prefer)
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        for path in self.files:
            for key, shape, dtype in self._headers(path):
                if key in self.file_of:
                    raise ConversionError(f"{path}: tensor {key} is also in {self.file_of[key]}")
                self.file_of[key], self.shapes[key], self.dtypes[key] = path, tuple(shape), dtype
        self._bin_cache: tuple[str, dict] | None = None

    def _headers(self, path: str):
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, "numpy") as f:
                    return [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]
            except Exception as e:  # SafetensorError for truncated/corrupt headers
                raise ConversionError(f"{path}: cannot read safetensors file, truncated or corrupt ({e})") from e
        sd = self._load_bin(path)
        return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]

    def _load_bin(self, path: str) -> dict:
        torch = _import_torch(path)
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ConversionError(f"{path}: cannot read PyTorch checkpoint, truncated or corrupt ({e})") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
            raise ConversionError(f"{path}: not a state dict of tensors")
        return sd

    def _bin(self, path: str) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != path:
            self._bin_cache = None  # drop the previous file's mapping first
            self._bin_cache = (path, self._load_bin(path))
        return self._bin_cache[1]

    def read(self, key: str) -> np.ndarray:
        path = self.file_of[key]
        if path.endswith(".safetensors"):
            try:  # open per tensor: the mapping (and its resident pages) is released right after
                with safe_open(path, "numpy") as f:
                    return f.get_tensor(key)
            except Exception as e:
                raise ConversionError(f"{path}: cannot read tensor {key} ({e})") from e
        return _torch_to_numpy(self._bin(path)[key])

    def keys_in(self, path: str) -> list[str]:
        return [k for k, p in self.file_of.items() if p == path]

    def close(self):
        self._bin_cache = None


_SRC_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "float32": "float32",
               "bfloat16": "bfloat16", "float16": "float16"}


def resolve_dtype(dtype: Optional[str]) -> Optional[str]:
    if dtype is None:
        return None
    name = DTYPE_ALIASES.get(str(dtype))
    if name is None:
        raise ConversionError(f"dtype {dtype!r} is not one of bf16, fp32, fp16")
    return name


def load_params_lazy(cfg: ModelConfig, reader: TensorReader, dtype: Optional[str] = None, reference: bool = False,
                     progress: bool = False) -> tuple[ModelConfig, dict]:
    """Validates all keys/shapes first, then fills preallocated params tensor by tensor.
    dtype None keeps the checkpoint's (embedding) dtype. Returns (cfg with param_dtype, numpy params)."""
    check_tensor_shapes(cfg, reader.shapes, reader.dir, reference)
    plan = key_plan(cfg, reference)
    src = reader.dtypes.get("model.embed_tokens.weight", "float32")
    src = _SRC_DTYPES.get(src)
    if src is None and dtype is None:
        raise ConversionError(f"{reader.file_of['model.embed_tokens.weight']}: model.embed_tokens.weight has dtype "
                              f"{reader.dtypes['model.embed_tokens.weight']}; pass dtype=bf16|fp32")
    dtype = dtype or src
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    npdt = numpy_dtype(dtype)

    def alloc(tree):
        return {k: alloc(v) if isinstance(v, dict) else np.empty(v, npdt) for k, v in tree.items()}

    params = alloc(param_shapes(cfg))
    bar = None
    if progress:
        bar = tqdm(total=len(reader.file_of), unit="tensor", dynamic_ncols=True)
    for path in reader.files:
        if bar is not None:
            bar.set_description(os.path.basename(path))
        for key in reader.keys_in(path):
            slot = plan.get(key)
            if slot is not None:
                w = reader.read(key)
                if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
                    raise ConversionError(f"{path}: {key} has non-float dtype {w.dtype}")
                dest = params
                for p in slot.path:
                    dest = dest[p]
                if slot.layer is not None:
                    dest = dest[slot.layer]
                np.copyto(dest, slot.to_a3(w), casting="unsafe")
                del w
            if bar is not None:
                bar.update(1)
        reader.close()
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings and "lm_head.weight" in reader.shapes:
        lm = reader.read("lm_head.weight").astype(npdt)
        if not np.array_equal(lm, params["embed"]):
            raise ConversionError(f"{reader.file_of['lm_head.weight']}: lm_head.weight differs from "
                                  f"model.embed_tokens.weight but tie_word_embeddings is true")
        del lm
    return cfg, params


def read_query_embed(model_dir: str, cfg: ModelConfig) -> Optional[np.ndarray]:
    """query_embed from `query_embed.safetensors` (written by `to_hf`), or None when absent."""
    path = os.path.join(model_dir, QUERY_EMBED_FILE)
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "numpy") as f:
            q = f.get_tensor("query_embed")
    except Exception as e:
        raise ConversionError(f"{path}: cannot read query_embed ({e})") from e
    if q.size != cfg.hidden_size:
        raise ConversionError(f"{path}: query_embed has shape {q.shape}, expected ({cfg.hidden_size},)")
    return q.reshape(cfg.hidden_size)


def from_hf(hf_dir: str, dtype: Optional[str] = None, progress: bool = False, **config_overrides):
    """(cfg, params) from a HF LLaMA directory; params are numpy arrays ready for `forward`.
    dtype: bf16 | fp32 | None (keep the checkpoint's). The query vector comes from
    `query_embed.safetensors` when the directory was written by `to_hf` (cfg.objective a3), else
    cfg.query_init (default: the mean token embedding; cfg.objective ar: a plain LLaMA). A gs:// directory is copied to the host's cache first
    (a3jax.fs.local_copy: safetensors are memory-mapped from local files)."""
    if fs.is_gcs(hf_dir):
        hf_dir = fs.local_copy(hf_dir)
    hf, path = read_config_json(hf_dir)
    # A plain LLaMA is a causal LM (objective ar: its content stream); `to_hf` of an A3 model writes the
    # trained query vector beside it, and only then is the model read back as A3.
    trained_query = os.path.exists(os.path.join(hf_dir, QUERY_EMBED_FILE))
    cfg = config_from_hf(hf, path, **{"objective": "a3" if trained_query else "ar", **config_overrides})
    reader = TensorReader(hf_dir)
    cfg, params = load_params_lazy(cfg, reader, resolve_dtype(dtype), reference=False, progress=progress)
    q = read_query_embed(hf_dir, cfg)
    params["query_embed"] = (query_embed_init(cfg, params["embed"]) if q is None
                             else q.astype(params["embed"].dtype))
    return cfg, params


# ----------------------------------------------------------------------------- writing


def _host(x) -> np.ndarray:
    return np.asarray(x)


def hf_tensors_of(cfg: ModelConfig, params, reference: bool = False) -> Iterable[tuple[str, Callable]]:
    """(key, thunk -> numpy tensor in HF layout) for every checkpoint tensor; thunks make one tensor at a time."""
    plan = key_plan(cfg, reference)
    E = cfg.hidden_size
    cache = {}

    def leaf(path):
        if path not in cache:  # one host copy per stacked leaf (a no-op for numpy params)
            cache.clear()
            node = params
            for p in path:
                node = node[p]
            cache[path] = _host(node)
        return cache[path]

    out = []
    for key, slot in plan.items():
        def thunk(key=key, slot=slot):
            w = leaf(slot.path)
            if slot.layer is not None:
                w = layer_to_hf(cfg, slot.path[1], w[slot.layer])
            elif key == "lm_head.weight":
                w = w.T
            elif key == "model.query_embed":
                w = w.reshape(1, 1, E)
            return np.ascontiguousarray(w)
        out.append((key, thunk))
    # Write stacked leaves together so each is brought to the host once.
    order = {p: i for i, p in enumerate(dict.fromkeys(s.path for s in plan.values()))}
    out.sort(key=lambda kv: (order[plan[kv[0]].path], plan[kv[0]].layer or 0))
    return [(k, t) for k, t in out]


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def stream_safetensors(path: str, entries, npdt, metadata=None) -> None:
    """Writes a safetensors file tensor by tensor: entries are (key, shape, thunk -> array); only one
    tensor is in memory at a time (safetensors.numpy.save_file would need the whole file in memory).
    Layout per the safetensors spec: u64 header size, JSON header (8-byte aligned), raw little-endian data."""
    dt = np.dtype(npdt)
    header, off = {"__metadata__": metadata or {"format": "pt"}}, 0
    for key, shape, _ in entries:
        n = int(np.prod(shape)) * dt.itemsize
        header[key] = {"dtype": _ST_DTYPES[dt.name], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, thunk in entries:
            w = np.ascontiguousarray(thunk().astype(dt, copy=False))
            if w.shape != tuple(shape):
                raise ConversionError(f"{path}: {key} has shape {w.shape}, expected {tuple(shape)}")
            f.write(memoryview(w.reshape(-1).view(np.uint8)))
            del w
    os.replace(tmp, path)


def write_safetensors(cfg: ModelConfig, params, out_dir: str, reference: bool = False,
                      max_shard_bytes: int = 5 * 2**30, dtype: Optional[str] = None, base: str = "model") -> list[str]:
    """Writes `<base>.safetensors` or `<base>-0000i-of-0000n.safetensors` + `<base>.safetensors.index.json`,
    streaming one tensor at a time."""
    npdt = numpy_dtype(resolve_dtype(dtype) or cfg.param_dtype)
    plan = key_plan(cfg, reference)
    items = hf_tensors_of(cfg, params, reference)
    nbytes = {k: int(np.prod(plan[k].shape)) * np.dtype(npdt).itemsize for k, _ in items}
    shards, cur, size = [], [], 0
    for k, _ in items:
        if cur and size + nbytes[k] > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes[k]
    shards.append(cur)
    thunks = dict(items)
    names = ([f"{base}.safetensors"] if len(shards) == 1 else
             [f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    shape_of = {k: plan[k].shape for k in nbytes}
    for name, keys in zip(names, shards):
        stream_safetensors(os.path.join(out_dir, name), [(k, shape_of[k], thunks[k]) for k in keys], npdt)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        with open(os.path.join(out_dir, f"{base}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=2)
    return [os.path.join(out_dir, n) for n in names]


def to_hf(cfg: ModelConfig, params, out_dir: str, dtype: Optional[str] = None,
          max_shard_bytes: int = 5 * 2**30, tokenizer_dir: Optional[str] = None) -> str:
    """Writes a HF LLaMA directory (config.json + model.safetensors or shards + index) that
    `transformers.LlamaForCausalLM.from_pretrained` loads, plus `query_embed.safetensors` when the
    params' objective trains the query stream (a3; a3jax.objectives: otherwise it was never trained).
    Only for block=llama (the reference block is not a HF LLaMA: use to_reference)."""
    if cfg.block != "llama":
        raise ConversionError(f"block={cfg.block!r}: a HF LLaMA computes the pre-norm `llama` block; "
                              f"export this model with to_reference / `a3jax convert a3-to-reference`")
    dtype = resolve_dtype(dtype) or cfg.param_dtype
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    write_safetensors(cfg, params, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)
    qpath = os.path.join(out_dir, QUERY_EMBED_FILE)
    if objectives.of(cfg).stream == "query":
        q = np.ascontiguousarray(_host(params["query_embed"]).astype(numpy_dtype(dtype)))
        save_file({"query_embed": q}, qpath, metadata={"format": "pt"})
    elif os.path.exists(qpath):
        # A content-stream objective (ar, mdlm) never trained the query vector (it still holds its random-init value):
        # without the file, hf-to-a3 starts it per query_init from the trained embeddings, as for
        # a released LLaMA.
        os.remove(qpath)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def count_params(params) -> int:
    n = 0
    for v in params.values():
        n += count_params(v) if isinstance(v, dict) else int(np.prod(np.shape(v)))
    return n


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"

