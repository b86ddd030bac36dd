"""LLaMA building blocks as pure functions: RMSNorm, RoPE (HF rotate-half layout), SwiGLU MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The dtype names configs and checkpoints use. jnp.bfloat16 is ml_dtypes.bfloat16, a numpy dtype too,
# so the host code (converters, checkpoints) derives its numpy dtypes from this table.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    """The jax dtype of a dtype name ("float32", "bfloat16", "float16")."""
    return DTYPES[name]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name (bfloat16 as ml_dtypes.bfloat16), for host arrays."""
    return np.dtype(dtype_of(name))


def rms_norm(x, weight, eps: float):
    """HF LlamaRMSNorm: statistics in fp32, cast back to the input dtype, then scale."""
    dt = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(dt) * xf.astype(dt)


def rope_inv_freq(cfg) -> np.ndarray:
    """Inverse frequencies [head_size/2] with HF's default / linear / llama3 scaling (fp64 on host)."""
    d = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(cfg, positions):
    """cos, sin [B, T, head_size] in fp32 for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; rotate-half layout as in HF's apply_rotary_pos_emb."""
    dt = x.dtype
    cos, sin = cos[:, :, None, :].astype(dt), sin[:, :, None, :].astype(dt)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def linear(x, w, n_in: int = 1, preferred_element_type=None):
    """x [*rows, *in] @ w [*in, *out] -> [*rows, *out] (in = the last n_in dims of x, the first of w),
    as one 2-D matmul over the flattened rows. Why 2-D: for a contraction over several row dims
    (b, t), XLA:CPU computes the weight gradient (a contraction over b and t) by copying the operands
    into transposed layouts, which cost as much as the matmuls (bench/profile_step.py); over one
    flattened row dim it does not, and the step is ~1.7x faster for the MLP. Same math, same result."""
    rows, ins = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    assert tuple(w.shape[:n_in]) == tuple(ins), (x.shape, w.shape, n_in)
    outs = w.shape[n_in:]
    k = math.prod(ins)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*rows, *outs)


def swiglu_mlp(x, w_gate, w_up, w_down):
    dt = x.dtype
    g = linear(x, w_gate.astype(dt))
    u = linear(x, w_up.astype(dt))
    return linear(jax.nn.silu(g) * u, w_down.astype(dt))


def token_logprobs(logits, ids):
    """log p(ids) of logits [..., V] at ids [...] (fp32 log-softmax): the one token log-prob gather that
    scoring and decoding share."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
