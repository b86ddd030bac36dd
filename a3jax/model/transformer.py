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
from a3jax.model.layers import apply_rope, dtype_of, linear, rms_norm, rope_cos_sin, swiglu_mlp
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


def _layer(cfg: ModelConfig, p, x, xc, q_vec, tq: int, rows, rope, rope_c, c_rows: Rows,
           cache_kv=None, cache_ids=None, update_content=True):
    """One two-stream block over the rows that get updated, as one stack (one matmul per weight).
    Returns (x' of those rows, (k, v) of the content rows).

    Three layouts of the input, chosen by the caller (`run_rows`):
    * x [B, Tc+Tq, E]: content rows then query rows, one residual stream carried across layers
      (Tq = 0 without query rows); xc and q_vec are None.
    * x [B, Tq, E] and xc [B, Tc, E] (update_content=False): only the query rows are updated; the
      content rows only give keys/values.
    * x None, xc and q_vec [E] (the first layer): every query row's input is the same vector
      (query_embed), so its norm and q projection are computed once and broadcast: exact, and it
      saves the q matmul over Tq rows (forward and backward).
    rows = (attend-up-to groups, segments) [B, R] and rope = (cos, sin) [B, R, D] of the updated
    rows; rope_c of the content rows (for the keys)."""
    dt = dtype_of(cfg.dtype)
    eps = cfg.rms_norm_eps
    wq = p["wq"].astype(dt)
    if q_vec is not None:
        b = xc.shape[0]
        hc = rms_norm(xc, p["attn_norm"], eps)
        xq = jnp.broadcast_to(q_vec, (b, tq, q_vec.shape[-1]))
        qq = jnp.broadcast_to(linear(rms_norm(q_vec, p["attn_norm"], eps), wq), (b, tq) + wq.shape[1:])
        if update_content:
            x = jnp.concatenate([xc, xq], axis=1)
            q = jnp.concatenate([linear(hc, wq), qq], axis=1)
        else:
            x, q = xq, qq
    elif xc is not None:
        hc = rms_norm(xc, p["attn_norm"], eps)
        q = linear(rms_norm(x, p["attn_norm"], eps), wq)
    else:
        tc = x.shape[1] - tq
        h = rms_norm(x, p["attn_norm"], eps)
        hc = h[:, :tc] if tq else h
        q = linear(h, wq)
    k = linear(hc, p["wk"].astype(dt))
    v = linear(hc, p["wv"].astype(dt))
    q = constrain(apply_rope(q, *rope), ("batch", "length", "act_heads", None))
    k = constrain(apply_rope(k, *rope_c), ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    keys_k, keys_v, keys_g, keys_s = k, v, c_rows.groups, c_rows.segments
    if cache_kv is not None:
        keys_k = jnp.concatenate([cache_kv[0].astype(dt), k], axis=1)
        keys_v = jnp.concatenate([cache_kv[1].astype(dt), v], axis=1)
        keys_g = jnp.concatenate([cache_ids[0], c_rows.groups], axis=1)
        keys_s = jnp.concatenate([cache_ids[1], c_rows.segments], axis=1)
    kind = attn_lib.choose_kernel(cfg, keys_k.shape[1])
    a = attn_lib.attention(kind, q, keys_k, keys_v, rows[0], rows[1], keys_g, keys_s,
                           cfg.attention_block_size)
    a = linear(a, p["wo"].astype(dt), n_in=2)
    if cfg.block == "llama":
        x = x + a
        x = x + swiglu_mlp(rms_norm(x, p["mlp_norm"], eps), p["w_gate"], p["w_up"], p["w_down"])
    else:  # reference code: v = post_norm(h + attn(in_norm(h))); h' = v + mlp(v)
        x = rms_norm(x + a, p["mlp_norm"], eps)
        x = x + swiglu_mlp(x, p["w_gate"], p["w_up"], p["w_down"])
    x = constrain(x, ("batch", "length", "act_embed"))
    return x, (k, v)


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

    need_content=False skips the last layer's content update (its output is never read).
    The two streams are one residual [B, Tc+Tq, E] across layers (content rows first); the row ids and
    RoPE tables of that stack are built once here, not per layer."""
    dt = dtype_of(cfg.dtype)
    xc = params["embed"].astype(dt)[c_tokens]
    xc = constrain(xc, ("batch", "length", "act_embed"))
    tc = xc.shape[1]
    rope_c = rope_cos_sin(cfg, c_rows.positions)
    ids_c = (masks.stream_groups(c_rows.groups, masks.CONTENT), c_rows.segments)
    tq, q_vec, ids_q, rope_q = 0, None, None, None
    rows, rope = ids_c, rope_c  # of the fused stack
    if q_rows is not None:
        tq = q_rows.positions.shape[1]
        q_vec = params["query_embed"].astype(dt)
        rope_q = rope_cos_sin(cfg, q_rows.positions)
        ids_q = (masks.stream_groups(q_rows.groups, masks.QUERY), q_rows.segments)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        rows, rope = jax.tree.map(cat, ids_c, ids_q), jax.tree.map(cat, rope_c, rope_q)
    cache_ids = (cache.groups, cache.segments) if cache is not None else None
    layers = params["layers"]
    L = cfg.num_layers

    def one(p, x, xc, ckv, mode):
        # mode: "fused" (x = content then query rows), "query" (x = the query rows; xc only gives
        # keys/values), "first" / "first_query": layer 0 (query rows from query_embed) with / without
        # the content update.
        update = mode in ("fused", "first")
        r, rp = (rows, rope) if update else (ids_q, rope_q)
        return _layer(cfg, p, x, xc, q_vec if mode.startswith("first") else None, tq, r, rp, rope_c, c_rows,
                      ckv, cache_ids, update)

    if cfg.remat != "none":
        one = jax.checkpoint(one, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(4,))

    def layer_p(l):
        return jax.tree.map(lambda a: a[l], layers)

    def layer_kv(l):
        return (cache.k[l], cache.v[l]) if cache is not None else None

    # The last layer's content update is only needed when the caller reads the content stream.
    n_full = L if (need_content or q_rows is None) else L - 1
    kvs = []
    x, first = xc, 0
    if q_vec is not None:  # layer 0 on its own: its query rows all start from query_embed
        if n_full == 0:
            x, kv = one(layer_p(0), None, xc, layer_kv(0), "first_query")
            return None, x, (jax.tree.map(lambda a: a[None], kv) if return_kv else None)
        x, kv = one(layer_p(0), None, xc, layer_kv(0), "first")
        if return_kv:
            kvs.append(jax.tree.map(lambda a: a[None], kv))
        first = 1
    if cfg.scan_layers and n_full > first:
        def body(x, inp):
            p, ckv = inp
            x, kv = one(p, x, None, ckv, "fused")
            return x, (kv if return_kv else None)

        mid = jax.tree.map(lambda a: a[first:n_full], layers)
        ckv = (cache.k[first:n_full], cache.v[first:n_full]) if cache is not None else None
        x, kv_scan = jax.lax.scan(body, x, (mid, ckv))
        if return_kv:
            kvs.append(kv_scan)
    else:
        for l in range(first, n_full):
            x, kv = one(layer_p(l), x, None, layer_kv(l), "fused")
            if return_kv:
                kvs.append(jax.tree.map(lambda a: a[None], kv))
    if n_full < L:  # query rows only; the content rows give keys/values
        x, kv = one(layer_p(L - 1), x[:, tc:], x[:, :tc], layer_kv(L - 1), "query")
        if return_kv:
            kvs.append(jax.tree.map(lambda a: a[None], kv))
        hc, hq = None, x
    else:
        hc, hq = x[:, :tc], (x[:, tc:] if q_rows is not None else None)
    kv_all = None
    if return_kv and kvs:
        kv_all = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)
    return hc, hq, kv_all


def lm_logits(cfg: ModelConfig, params, h):
    """final_norm + lm_head (tied: embed^T), logits in fp32."""
    dt = dtype_of(cfg.dtype)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = linear(h, w.astype(dt), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "act_vocab"))


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
