"""GGUF (llama.cpp's single-file format) -> a3jax. Read with the `gguf` package (llama.cpp's own
Python reader); torch-free.

What is read: the `general.architecture` (only `llama`), the `llama.*` hyperparameters, every tensor
(dequantized to float32 by `gguf.quants.dequantize`: F32, F16, BF16, Q4_0 ... Q8_0, the K-quants and
the IQ types), and the tokenizer (a3jax.convert.gguf_tokenizer).

Layout: a GGUF tensor's numpy shape is the ggml shape reversed, which is HF's [out, in]; the tensors
are renamed to HF LLaMA keys and placed by the same key plan as `from_hf`. llama.cpp's converter
permutes the rows of attn_q / attn_k for its interleaved RoPE; `unpermute_rope` undoes that, back to
the rotate-half layout of HF and a3jax.

Memory: the file is memory-mapped; params are preallocated once in the target dtype and filled one
dequantized tensor at a time (`load_params_lazy`), so the peak is one copy of the weights plus one
float32 tensor plus the mapped pages of the (small, quantized) file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from a3jax.config import ModelConfig
from a3jax.convert.hf import ConversionError, converted_config, key_plan, load_params_lazy, resolve_dtype
from a3jax.model import query_embed_init
from a3jax.model.layers import rope_inv_freq

GGUF_LAYER_NAMES = {  # GGUF name in blk.N. -> HF key suffix in model.layers.N.
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling: per-frequency divisors
DEQUANT_ROWS = 4096  # rows dequantized at a time


def _import_gguf():
    try:
        import gguf  # deferred: only GGUF conversion needs it
    except ImportError as e:
        raise ConversionError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    return gguf


def hf_key(name: str) -> Optional[str]:
    """GGUF tensor name -> HF LLaMA key (None for names a LLaMA has no place for)."""
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}"
    return None


def gguf_name(key: str) -> str:
    """HF LLaMA key -> GGUF tensor name (inverse of hf_key)."""
    for name, hf in GGUF_TOP_NAMES.items():
        if key == hf:
            return name
    _, _, i, rest = key.split(".", 3)
    return f"blk.{i}." + {v: k for k, v in GGUF_LAYER_NAMES.items()}[rest]


def _ggml_shape(shape) -> tuple:
    """A numpy (HF) shape as GGUF writes it: ggml order, innermost first."""
    return tuple(reversed(shape))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (per head: the pairs of RoPE's interleaved layout) -> HF's rotate-half
    order (per head: all first halves, then all second halves). w: [n_heads * head_dim, in]."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


class GGUFFile:
    """The fields (metadata) and tensor table of one GGUF file, memory-mapped."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: no such GGUF file")
        gguf = _import_gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # ValueError / struct errors on a truncated or foreign file
            raise ConversionError(f"{path}: cannot read GGUF file, truncated or not GGUF ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise ConversionError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, numpy shape (HF's [out, in])."""
        gguf = _import_gguf()
        t = self.tensors[name]
        shape = self.shape(name)
        data = t.data  # [rows, bytes per row] for quantized types; a view into the mapped file
        try:
            if data.ndim < 2 or data.shape[0] <= DEQUANT_ROWS:
                return np.asarray(gguf.quants.dequantize(data, t.tensor_type), np.float32).reshape(shape)
            # Row chunks into one float32 result: dequantizing a big tensor at once makes temporaries
            # several times its float32 size (the embedding is the largest tensor of most models).
            out = np.empty((data.shape[0], int(np.prod(shape[1:]))), np.float32)
            for i in range(0, data.shape[0], DEQUANT_ROWS):
                out[i:i + DEQUANT_ROWS] = gguf.quants.dequantize(data[i:i + DEQUANT_ROWS], t.tensor_type).reshape(
                    -1, out.shape[1])
            return out.reshape(shape)
        except NotImplementedError as e:
            raise ConversionError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize ({e})") from e

    def shape(self, name: str) -> tuple:
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def drop_metadata(self) -> None:
        """Frees the parsed metadata (the reader keeps every vocabulary entry as numpy views: about
        150 MB for a 49k vocabulary); the tensors stay readable."""
        self.reader.fields.clear()


# ----------------------------------------------------------------------------- metadata


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """The per-frequency divisors cfg's llama3 RoPE scaling applies (what llama.cpp stores as rope_freqs)."""
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_type="default")).astype(np.float64)
    return plain / rope_inv_freq(cfg).astype(np.float64)


def config_from_gguf(g: GGUFFile, **overrides) -> ModelConfig:
    """The `llama.*` metadata -> ModelConfig; refuses other architectures, MoE and unsupported RoPE."""
    where = g.path
    arch = g.need("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{where}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    a = "llama."
    if int(g.get(a + "expert_count", 0) or 0) > 0:
        raise ConversionError(f"{where}: {a}expert_count={g.get(a + 'expert_count')}: mixture-of-experts models "
                              f"are not supported")
    heads = int(g.need(a + "attention.head_count"))
    hidden = int(g.need(a + "embedding_length"))
    head_dim = int(g.get(a + "attention.key_length", hidden // heads))
    if int(g.get(a + "attention.value_length", head_dim)) != head_dim:
        raise ConversionError(f"{where}: {a}attention.value_length={g.get(a + 'attention.value_length')} differs "
                              f"from the key length {head_dim}; LLaMA uses one head size")
    rot = int(g.get(a + "rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ConversionError(f"{where}: {a}rope.dimension_count={rot} but the head size is {head_dim}; partial "
                              f"rotary embeddings are not supported")
    tok_embd = g.tensors.get("token_embd.weight")
    vocab = int(g.get(a + "vocab_size", 0) or 0) or (g.shape("token_embd.weight")[0] if tok_embd is not None else 0)
    if not vocab:
        tokens = g.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else 0
    rope = dict(rope_type="default", rope_factor=1.0)
    stype = g.get(a + "rope.scaling.type", "none")
    if stype == "linear":
        rope = dict(rope_type="linear", rope_factor=float(g.need(a + "rope.scaling.factor")))
    elif stype not in ("none", ""):
        raise ConversionError(f"{where}: {a}rope.scaling.type={stype!r} is not supported (none, linear; llama3 "
                              f"scaling comes as the {ROPE_FREQS} tensor)")

    def tok(key):
        v = g.get(f"tokenizer.ggml.{key}")
        return -1 if v is None else int(v)

    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(g.need(a + "feed_forward_length")),
        num_layers=int(g.need(a + "block_count")), num_heads=heads,
        num_kv_heads=int(g.get(a + "attention.head_count_kv", heads)),
        head_dim=0 if head_dim * heads == hidden else head_dim,
        max_position_embeddings=int(g.get(a + "context_length", 2048)),
        rms_norm_eps=float(np.float32(g.get(a + "attention.layer_norm_rms_epsilon", 1e-5))),
        tie_word_embeddings="output.weight" not in g.tensors,
        rope_theta=float(g.get(a + "rope.freq_base", 10000.0)), **rope,
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("padding_token_id"),
        objective="ar",  # a GGUF LLaMA is a causal LM: its query stream is untrained until adapted
    )
    # float32 metadata: 1e-5 is stored as 9.99999974e-06; keep the decimal a user would write
    kwargs["rms_norm_eps"] = float(f"{kwargs['rms_norm_eps']:.6g}")
    if ROPE_FREQS in g.tensors:
        kwargs.update(_llama3_rope(g, kwargs))
    return converted_config(kwargs, overrides, where)


def _llama3_rope(g: GGUFFile, kwargs: dict) -> dict:
    """llama3 RoPE scaling from the rope_freqs tensor: the factor is its largest divisor; the low/high
    frequency factors (not stored) must be Meta's 1 and 4, checked by recomputing every divisor."""
    freqs = g.tensor(ROPE_FREQS).reshape(-1).astype(np.float64)
    orig = int(g.get("llama.rope.scaling.original_context_length", 8192))
    rope = dict(rope_type="llama3", rope_factor=float(freqs.max()), rope_low_freq_factor=1.0,
                rope_high_freq_factor=4.0, rope_original_max_position=orig)
    want = llama3_rope_factors(ModelConfig(**{**kwargs, **rope}))
    if want.shape != freqs.shape or not np.allclose(want, freqs, rtol=1e-5):
        raise ConversionError(f"{g.path}: tensor {ROPE_FREQS} does not match llama3 RoPE scaling (factor "
                              f"{rope['rope_factor']}, low/high frequency factors 1/4, original context {orig}); "
                              f"other RoPE frequency tables are not supported")
    return rope


# ----------------------------------------------------------------------------- tensors


class GGUFTensorReader:
    """The TensorReader surface `load_params_lazy` fills params from, over a GGUF file: HF keys,
    HF shapes, and `read(key)` = the dequantized float32 tensor in HF layout (q/k unpermuted)."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig):
        self.g, self.cfg = g, cfg
        self.dir = g.path
        self.files = [g.path]
        self.name_of: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        unknown = []
        for name in g.tensors:
            if name == ROPE_FREQS:
                continue  # read into the config
            key = hf_key(name)
            if key is None:
                unknown.append(f"unexpected tensor {name} with shape {g.shape(name)} ({g.tensors[name].tensor_type.name})")
                continue
            self.name_of[key] = name
            self.shapes[key] = g.shape(name)
        problems = []
        for key, slot in key_plan(cfg).items():  # in GGUF names: the ones the user can look up
            name = gguf_name(key)
            if key not in self.shapes:
                problems.append(f"missing tensor {name} (expected shape {_ggml_shape(slot.shape)})")
            elif self.shapes[key] != slot.shape:
                problems.append(f"tensor {name}: shape {_ggml_shape(self.shapes[key])}, expected "
                                f"{_ggml_shape(slot.shape)}")
        problems += unknown
        if problems:
            raise ConversionError(f"{g.path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        self.file_of = {k: g.path for k in self.name_of}
        self.dtypes = {k: "float32" for k in self.name_of}  # dequantized

    def read(self, key: str) -> np.ndarray:
        w = self.g.tensor(self.name_of[key])
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope(w, self.cfg.num_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope(w, self.cfg.num_kv_heads)
        return w

    def keys_in(self, path: str) -> list[str]:
        return list(self.name_of)

    def close(self):
        pass


def open_gguf(src) -> GGUFFile:
    """A GGUFFile from a path (or the GGUFFile itself)."""
    return src if isinstance(src, GGUFFile) else GGUFFile(os.fspath(src))


def tensor_types(src) -> dict[str, int]:
    """GGML type name -> number of tensors of that type in the file (for reports)."""
    g = open_gguf(src)
    out: dict[str, int] = {}
    for t in g.tensors.values():
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def from_gguf(path, dtype: Optional[str] = None, progress: bool = False, **config_overrides):
    """(cfg, params) from a GGUF file; params are numpy arrays ready for `forward`. dtype: fp32 (the
    default: every dequantized value is exact in fp32) | bf16 | fp16. The query vector starts per
    cfg.query_init (default: the mean token embedding). The tokenizer: `gguf_tokenizer.write_tokenizer`
    (call it first when passing one GGUFFile to both: this drops the file's parsed metadata)."""
    g = open_gguf(path)
    cfg = config_from_gguf(g, **config_overrides)
    reader = GGUFTensorReader(g, cfg)
    g.drop_metadata()  # before the params are allocated: the peak is the params plus one tensor
    cfg, params = load_params_lazy(cfg, reader, resolve_dtype(dtype) or "float32", progress=progress)
    params["query_embed"] = query_embed_init(cfg, params["embed"])
    return cfg, params
