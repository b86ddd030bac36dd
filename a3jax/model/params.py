"""The parameter table: every param's shape, logical axes, initializer and weight decay, in one place.

Everything that needs the shape of the param tree derives it from `param_specs(cfg)`: the linen
module's param declarations (transformer.py), the shapes and logical axes that sharding, checkpoints
and the converters use, the optimizer's weight-decay mask (train/state.py) and the tests' random
params. So the module, the converters and the optimizer cannot disagree about the tree.

Per-layer weights are stacked on a leading `layers` axis (one tree for the scanned and the unrolled
layer loop):

    embed [V, E]            query_embed [E]          final_norm [E]         lm_head [E, V] (untied)
    layers/attn_norm [L, E]  wq [L, E, H, D]  wk, wv [L, E, Hkv, D]  wo [L, H, D, E]
    layers/mlp_norm [L, E]   w_gate, w_up [L, E, M]  w_down [L, M, E]
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig

# How a param starts.
NORMAL = "normal"  # N(0, cfg.init_std)
ONES = "ones"  # RMSNorm scales
QUERY = "query"  # the query vector: query_embed_init(cfg, embed), per cfg.query_init

# Logical axis -> the size of that dimension in a config. A param's shape follows from its axes, so
# the two cannot disagree.
AXIS_SIZES = {
    "vocab": lambda c: c.vocab_size,
    "embed": lambda c: c.hidden_size,
    "heads": lambda c: c.num_heads,
    "kv_heads": lambda c: c.num_kv_heads,
    "head_dim": lambda c: c.head_size,
    "mlp": lambda c: c.intermediate_size,
    "layers": lambda c: c.num_layers,
}

# name -> (logical axes, init, weight decay). Weight decay applies to matrices only; the RMSNorm scales
# and the learned query vector are not decayed (GPT-2/LLaMA practice: decay 2-D weights, not gains or
# biases; the per-layer norm scales are [L, E], so this cannot be decided by ndim).
# The order is the declaration order: flax draws each param's PRNG key by its rank within its scope,
# and query_embed's init reads embed, so embed comes first.
_TABLE = {
    "embed": (("vocab", "embed"), NORMAL, True),
    "query_embed": (("embed",), QUERY, False),
    "final_norm": (("embed",), ONES, False),
    "lm_head": (("embed", "vocab"), NORMAL, True),  # only when untied: tied models read embed^T
    "layers": {
        "attn_norm": (("layers", "embed"), ONES, False),
        "wq": (("layers", "embed", "heads", "head_dim"), NORMAL, True),
        "wk": (("layers", "embed", "kv_heads", "head_dim"), NORMAL, True),
        "wv": (("layers", "embed", "kv_heads", "head_dim"), NORMAL, True),
        "wo": (("layers", "heads", "head_dim", "embed"), NORMAL, True),
        "mlp_norm": (("layers", "embed"), ONES, False),
        "w_gate": (("layers", "embed", "mlp"), NORMAL, True),
        "w_up": (("layers", "embed", "mlp"), NORMAL, True),
        "w_down": (("layers", "mlp", "embed"), NORMAL, True),
    },
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One param: its shape, one logical axis name per dimension, its init (NORMAL, ONES or QUERY) and
    whether AdamW decays it."""
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str
    decay: bool


def _present(name: str, cfg: ModelConfig) -> bool:
    return not (name == "lm_head" and cfg.tie_word_embeddings)


def param_specs(cfg: ModelConfig) -> dict:
    """The param tree of `cfg` as nested dicts of ParamSpec, in declaration order."""
    def build(table):
        out = {}
        for name, entry in table.items():
            if isinstance(entry, dict):
                out[name] = build(entry)
            elif _present(name, cfg):
                axes, init, decay = entry
                out[name] = ParamSpec(tuple(AXIS_SIZES[a](cfg) for a in axes), axes, init, decay)
        return out

    return build(_TABLE)


def map_specs(fn, specs: dict) -> dict:
    """`fn(spec)` at every leaf of a param_specs tree, keeping its structure and order."""
    return {k: map_specs(fn, v) if isinstance(v, dict) else fn(v) for k, v in specs.items()}


def param_shapes(cfg: ModelConfig) -> dict:
    """Shape tuples, same tree as the params."""
    return map_specs(lambda s: s.shape, param_specs(cfg))


def param_count(cfg: ModelConfig) -> int:
    """Number of scalar params of `cfg` (from the table; no arrays made)."""
    def total(specs):
        return sum(total(v) if isinstance(v, dict) else int(np.prod(v.shape)) for v in specs.values())

    return total(param_specs(cfg))


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names per param, same tree as param_shapes (used for sharding)."""
    return map_specs(lambda s: s.axes, param_specs(cfg))


def decay_mask(tree):
    """True for the leaves that get weight decay, per the table; `tree` is any tree with the params'
    structure and array leaves (params, grads, ShapeDtypeStructs). A name that is not in the table is
    an error, not a guess."""
    def decayed(path, _):
        entry = _TABLE
        for key in path:
            name = getattr(key, "key", key)
            if name not in entry:
                raise KeyError(f"param {jax.tree_util.keystr(path)} is not in the param table (a3jax/model/params.py)")
            entry = entry[name]
        return entry[2]

    return jax.tree_util.tree_map_with_path(decayed, tree)


def embed_mean(embed, chunk: int = 8192):
    """Mean token embedding [E] in float32. On the host (numpy, the converters) it is summed `chunk` rows
    at a time in float64, so a big bf16 table never gets a full float32 copy; a jax array (init, the
    trainer) takes one reduction, into which XLA fuses the cast under jit."""
    if not isinstance(embed, np.ndarray):
        return jnp.mean(embed.astype(jnp.float32), axis=0)
    acc = np.zeros(embed.shape[1], np.float64)
    for s in range(0, embed.shape[0], chunk):
        acc += embed[s:s + chunk].astype(np.float64).sum(axis=0)
    return (acc / embed.shape[0]).astype(np.float32)


def query_embed_init(cfg: ModelConfig, embed, rng=None):
    """The learned query vector's start, in embed's dtype, per cfg.query_init: the mean token embedding
    (embed_mean, the default), N(0, 1) as the reference code (`rng`, a jax key; PRNGKey(0) when None),
    or zeros. A numpy `embed` (the converters) gives a numpy vector, a jax one a jax vector."""
    host = isinstance(embed, np.ndarray)
    if cfg.query_init == "embed_mean":
        return embed_mean(embed).astype(embed.dtype)
    if cfg.query_init == "normal":
        q = jax.random.normal(jax.random.PRNGKey(0) if rng is None else rng, (cfg.hidden_size,), embed.dtype)
        return np.asarray(q) if host else q
    return (np if host else jnp).zeros((cfg.hidden_size,), embed.dtype)


def initializer(cfg: ModelConfig, spec: ParamSpec, created: dict):
    """The jax initializer `(key, shape, dtype) -> array` of `spec`. `created` holds the params already
    declared at the same level (the query vector's init reads embed)."""
    if spec.init == NORMAL:
        return jax.nn.initializers.normal(cfg.init_std)
    if spec.init == ONES:
        return jax.nn.initializers.ones
    if spec.init == QUERY:
        return lambda key, shape, dtype: query_embed_init(cfg, created["embed"], key).astype(dtype)
    raise ValueError(f"unknown init {spec.init!r}")


def numpy_init(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params of the same tree, shapes and distributions as the linen init, drawn on the host
    with numpy (float32 jax arrays). The linen init runs the model op by op, which costs tens of seconds
    for a small model on a loaded 2-core machine; tests and benchmarks that only need some random
    model use this. Leaves are drawn in sorted-name order, so the numbers do not depend on the
    table's order."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if spec.init == ONES:
            return jnp.ones(spec.shape, jnp.float32)
        if spec.init == NORMAL:
            return jnp.asarray(rng.normal(0.0, cfg.init_std, spec.shape), jnp.float32)
        return None  # the query vector, made from the embedding below

    params = jax.tree.map(draw, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    params["query_embed"] = query_embed_init(cfg, params["embed"])
    return params
