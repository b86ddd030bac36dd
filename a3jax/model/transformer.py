"""The two-stream A3 LLaMA.

Params: the 'params' collection, laid out by the table in a3jax/model/params.py (per-layer weights
stacked on a leading `layers` axis, so the same tree serves the scanned and the unrolled layer loop
and converts to HF by slicing). The linen module declares exactly that table.

The core is `run_rows`: content rows (which produce keys/values and are updated) and query rows
(which only read) go through every layer together. Training stacks the T content and T query rows
into one 2T-row batch for the projections and the MLP; decoding passes a KV cache of earlier groups
and only the new rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from a3jax import masks
from a3jax.config import ModelConfig
from a3jax.model import attention as attn_lib
from a3jax.model.layers import apply_rope, dtype_of, rms_norm, rope_cos_sin, swiglu_mlp
from a3jax.model.params import initializer, param_specs
from a3jax.sharding import constrain


class Rows(NamedTuple):
    """Ids of a set of rows: original positions (RoPE), group ids and segment ids, each [B, T]."""
    positions: jax.Array
    groups: jax.Array
    segments: jax.Array


class KVCache(NamedTuple):
    """Content keys/values of already-committed rows, per layer: k/v [L, B, S, Hkv, D] (RoPE applied),
    with their group and segment ids [B, S] (segment 0 = empty slot)."""
    k: jax.Array
    v: jax.Array
    groups: jax.Array
    segments: jax.Array


def _constrain(x, names):
    return constrain(x, names)


def _layer(cfg: ModelConfig, p, xc, xq, c_rows: Rows, q_rows: Optional[Rows], rope_c, rope_q,
           cache_kv=None, cache_ids=None, update_content=True):
    """One two-stream block. Returns (xc', xq', (k, v) of the content rows)."""
    dt = dtype_of(cfg.dtype)
    tc = xc.shape[1]
    # Rows that get updated: content rows (unless skipped) then query rows, stacked for one matmul.
    # The content rows' normed input also feeds K/V, so each row set is normed once.
    hc = rms_norm(xc, p["attn_norm"], cfg.rms_norm_eps)
    parts, normed, ids, ropes = [], [], [], []
    if update_content:
        parts.append(xc)
        normed.append(hc)
        ids.append((masks.stream_groups(c_rows.groups, masks.CONTENT), c_rows.segments))
        ropes.append(rope_c)
    if xq is not None:
        parts.append(xq)
        normed.append(rms_norm(xq, p["attn_norm"], cfg.rms_norm_eps))
        ids.append((masks.stream_groups(q_rows.groups, masks.QUERY), q_rows.segments))
        ropes.append(rope_q)
    stack = lambda xs: jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
    x, h = stack(parts), stack(normed)
    row_groups = jnp.concatenate([g for g, _ in ids], axis=1)
    row_segs = jnp.concatenate([s for _, s in ids], axis=1)
    cos = jnp.concatenate([r[0] for r in ropes], axis=1)
    sin = jnp.concatenate([r[1] for r in ropes], axis=1)

    q = jnp.einsum("bte,ehd->bthd", h, p["wq"].astype(dt))
    k = jnp.einsum("bte,ehd->bthd", hc, p["wk"].astype(dt))
    v = jnp.einsum("bte,ehd->bthd", hc, p["wv"].astype(dt))
    q = _constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
    k = _constrain(apply_rope(k, *rope_c), ("batch", "length", "act_kv_heads", None))
    v = _constrain(v, ("batch", "length", "act_kv_heads", None))
    keys_k, keys_v, keys_g, keys_s = k, v, c_rows.groups, c_rows.segments
    if cache_kv is not None:
        keys_k = jnp.concatenate([cache_kv[0].astype(dt), k], axis=1)
        keys_v = jnp.concatenate([cache_kv[1].astype(dt), v], axis=1)
        keys_g = jnp.concatenate([cache_ids[0], c_rows.groups], axis=1)
        keys_s = jnp.concatenate([cache_ids[1], c_rows.segments], axis=1)
    kind = attn_lib.choose_kernel(cfg, keys_k.shape[1])
    a = attn_lib.attention(kind, q, keys_k, keys_v, row_groups, row_segs, keys_g, keys_s,
                           cfg.attention_block_size)
    a = jnp.einsum("bthd,hde->bte", a, p["wo"].astype(dt))
    if cfg.block == "llama":
        x = x + a
        x = x + swiglu_mlp(rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps), p["w_gate"], p["w_up"], p["w_down"])
    else:  # reference code: v = post_norm(h + attn(in_norm(h))); h' = v + mlp(v)
        x = rms_norm(x + a, p["mlp_norm"], cfg.rms_norm_eps)
        x = x + swiglu_mlp(x, p["w_gate"], p["w_up"], p["w_down"])
    x = _constrain(x, ("batch", "length", "act_embed"))
    if update_content:
        new_c, new_q = x[:, :tc], (x[:, tc:] if xq is not None else None)
    else:
        new_c, new_q = xc, x
    return new_c, new_q, (k, v)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_rows(cfg: ModelConfig, params, c_tokens, c_rows: Rows, q_rows: Optional[Rows] = None,
             cache: Optional[KVCache] = None, need_content: bool = True, return_kv: bool = False):
    """Runs content rows (tokens c_tokens) and optional query rows (start from query_embed) through all
    layers. Returns (content hidden [B,Tc,E] or None, query hidden [B,Tq,E] or None, kv) where kv is
    the new rows' per-layer (k, v) stacked [L, B, Tc, Hkv, D] when return_kv, else None.

    need_content=False skips the last layer's content update (its output is never read)."""
    dt = dtype_of(cfg.dtype)
    xc = params["embed"].astype(dt)[c_tokens]
    xc = _constrain(xc, ("batch", "length", "act_embed"))
    xq = None
    rope_q = None
    if q_rows is not None:
        b, tq = q_rows.positions.shape
        xq = jnp.broadcast_to(params["query_embed"].astype(dt), (b, tq, cfg.hidden_size))
        rope_q = rope_cos_sin(cfg, q_rows.positions)
    rope_c = rope_cos_sin(cfg, c_rows.positions)
    cache_ids = (cache.groups, cache.segments) if cache is not None else None
    layers = params["layers"]
    L = cfg.num_layers

    def one(p, xc, xq, ckv, update_content):
        return _layer(cfg, p, xc, xq, c_rows, q_rows, rope_c, rope_q, ckv, cache_ids, update_content)

    if cfg.remat != "none":
        one = jax.checkpoint(one, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(4,))

    # The last layer's content update is only needed when the caller reads the content stream.
    n_full = L if (need_content or q_rows is None) else L - 1
    kvs = []
    if cfg.scan_layers and n_full > 0:
        def body(carry, inp):
            xc, xq = carry
            p, ckv = inp
            xc, xq, kv = one(p, xc, xq, ckv, True)
            return (xc, xq), (kv if return_kv else None)

        head = jax.tree.map(lambda a: a[:n_full], layers)
        ckv = (cache.k[:n_full], cache.v[:n_full]) if cache is not None else None
        (xc, xq), kv_scan = jax.lax.scan(body, (xc, xq), (head, ckv))
        if return_kv:
            kvs.append(kv_scan)
    else:
        for l in range(n_full):
            p = jax.tree.map(lambda a: a[l], layers)
            ckv = (cache.k[l], cache.v[l]) if cache is not None else None
            xc, xq, kv = one(p, xc, xq, ckv, True)
            if return_kv:
                kvs.append(jax.tree.map(lambda a: a[None], kv))
    if n_full < L:
        p = jax.tree.map(lambda a: a[L - 1], layers)
        ckv = (cache.k[L - 1], cache.v[L - 1]) if cache is not None else None
        _, xq, kv = one(p, xc, xq, ckv, False)
        if return_kv:
            kvs.append(jax.tree.map(lambda a: a[None], kv))
        xc = None
    kv_all = None
    if return_kv and kvs:
        kv_all = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)
    return xc, xq, kv_all


def lm_logits(cfg: ModelConfig, params, h):
    """final_norm + lm_head (tied: embed^T), logits in fp32."""
    dt = dtype_of(cfg.dtype)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("bte,ev->btv", h, w.astype(dt), preferred_element_type=jnp.float32)
    return _constrain(logits, ("batch", "length", "act_vocab"))


def apply_model(cfg: ModelConfig, params, tokens, positions, groups, segment_ids, stream: str = "query"):
    """Pure forward over one layout: logits [B, T, V] fp32 of the query or the content stream."""
    rows = Rows(positions, groups, segment_ids)
    if stream == "query":
        _, hq, _ = run_rows(cfg, params, tokens, rows, rows, need_content=False)
        return lm_logits(cfg, params, hq)
    if stream == "content":
        hc, _, _ = run_rows(cfg, params, tokens, rows, None)
        return lm_logits(cfg, params, hc)
    raise ValueError(f"stream must be 'query' or 'content', got {stream!r}")


def _declare(module: nn.Module, cfg: ModelConfig, path: tuple = ()) -> dict:
    """Declares the level `path` of the param table on `module`, in table order (flax draws each
    param's key by its rank in the scope); a nested level becomes a submodule of that name."""
    specs = param_specs(cfg)
    for name in path:
        specs = specs[name]
    pdt = dtype_of(cfg.param_dtype)
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, dict):
            out[name] = _ParamGroup(cfg, path + (name,), name=name)()
        else:
            init = nn.with_logical_partitioning(initializer(cfg, spec, out), spec.axes)
            out[name] = module.param(name, init, spec.shape, pdt)
    return out


class _ParamGroup(nn.Module):
    """A nested level of the param table (`layers`: the stacked per-layer weights)."""

    cfg: ModelConfig
    level: tuple  # its path in the table (flax reserves `path`)

    @nn.compact
    def __call__(self):
        return _declare(self, self.cfg, self.level)


class A3Transformer(nn.Module):
    """Linen module: declares the params of the table (with logical axis names) and calls `apply_model`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, groups, segment_ids, stream: str = "query"):
        params = _declare(self, self.cfg)
        return apply_model(self.cfg, params, tokens, positions, groups, segment_ids, stream)
