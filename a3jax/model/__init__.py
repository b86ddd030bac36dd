"""Public model surface: `A3Transformer`, `forward`, `init_params`, input validation, the param table."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a3jax import layout as layout_lib
from a3jax import sharding
from a3jax.config import ModelConfig
from a3jax.model.attention import choose_kernel
from a3jax.model.layers import dtype_of, numpy_dtype, token_logprobs
from a3jax.model.params import (ParamSpec, decay_mask, numpy_init, param_axes, param_count, param_shapes,
                                param_specs, query_embed_init)
from a3jax.model.transformer import A3Transformer, KVCache, Rows, apply_model, lm_logits, run_rows
from a3jax.model import diffusion

__all__ = ["A3Transformer", "forward", "init_params", "validate_inputs", "default_layout", "InputError",
           "KVCache", "Rows", "apply_model", "lm_logits", "run_rows",
           "ParamSpec", "param_specs", "param_shapes", "param_axes", "param_count", "decay_mask", "query_embed_init",
           "numpy_init", "dtype_of", "numpy_dtype", "token_logprobs", "choose_kernel",
           "param_shardings", "shard_params", "init_params_sharded", "diffusion"]


class InputError(ValueError):
    """Bad model input, raised before anything is compiled."""


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate_inputs(cfg: ModelConfig, tokens, positions=None, groups=None, segment_ids=None):
    """Shape checks always; value checks (ids below vocab, positions within range) when concrete."""
    tshape = tuple(np.shape(tokens))
    if len(tshape) != 2:
        raise InputError(f"tokens must be [batch, length], got shape {tshape}")
    for name, arr in (("positions", positions), ("groups", groups), ("segment_ids", segment_ids)):
        if arr is not None and tuple(np.shape(arr)) != tshape:
            raise InputError(f"{name} has shape {tuple(np.shape(arr))} but tokens has shape {tshape}")
    if _is_concrete(tokens) and (msg := layout_lib.token_range_error(tokens, cfg.vocab_size)):
        raise InputError(msg)
    if positions is not None and _is_concrete(positions):
        p = np.asarray(positions)
        if p.size and (p.min() < 0 or p.max() >= cfg.max_position_embeddings):
            bad = int(p.min()) if p.min() < 0 else int(p.max())  # the one that is out of range
            raise InputError(f"position {bad} is outside [0, max_position_embeddings={cfg.max_position_embeddings})")
    elif positions is None and tshape[1] > cfg.max_position_embeddings:
        raise InputError(f"length {tshape[1]} exceeds max_position_embeddings={cfg.max_position_embeddings}")


def default_layout(tokens, positions=None, groups=None, segment_ids=None):
    """(tokens, positions, groups, segment_ids) as int32, with a3jax.layout's defaults filled."""
    lay = layout_lib.with_defaults(tokens, positions, groups, segment_ids)
    return lay.tokens, lay.positions, lay.groups, lay.segment_ids


@functools.partial(jax.jit, static_argnums=(0, 6))
def _forward_jit(cfg, params, tokens, positions, groups, segment_ids, stream):
    return apply_model(cfg, params, tokens, positions, groups, segment_ids, stream)


def forward(cfg: ModelConfig, params, tokens, positions=None, groups=None, segment_ids=None, stream="query"):
    """Logits [B, T, V] float32 of the query stream (default) or the content stream."""
    if stream not in ("query", "content"):
        raise InputError(f"stream must be 'query' or 'content', got {stream!r}")
    validate_inputs(cfg, tokens, positions, groups, segment_ids)
    return _forward_jit(cfg, params, *default_layout(tokens, positions, groups, segment_ids), stream)


def init_params(cfg: ModelConfig, rng, length: int = 8):
    """Random params (unboxed pytree) for `cfg`; shapes do not depend on `length`."""
    model = A3Transformer(cfg)
    dummy = jnp.zeros((1, length), jnp.int32)
    ar = jnp.arange(length, dtype=jnp.int32)[None]
    variables = model.init(rng, dummy, ar, ar, jnp.ones_like(dummy))
    return nn.meta.unbox(variables["params"])


# Param placement (here, not in a3jax.sharding: that module knows no model, so the model can import it).


def param_shardings(cfg: ModelConfig, mesh, rules):
    """NamedShardings of the params tree, from the table's logical axes and the mesh's rules."""
    return sharding.tree_shardings(param_axes(cfg), param_shapes(cfg), mesh, rules)


def shard_params(params, cfg: ModelConfig, mesh, rules):
    """Places a host params tree onto the mesh."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def init_params_sharded(cfg: ModelConfig, rng, mesh, rules):
    """Random init directly into the target shardings (no full host copy; works at 8B scale)."""
    with sharding.activate(mesh, rules):
        return jax.jit(lambda r: init_params(cfg, r), out_shardings=param_shardings(cfg, mesh, rules))(rng)
