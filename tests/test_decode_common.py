"""Shared tiny model for the decode / score / eval tests (imported by them; holds no tests itself)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from a3jax.config import ModelConfig
from a3jax.model import ParamSpec, param_specs, query_embed_init
from a3jax.model.params import NORMAL, ONES

# init_std 0.5 gives peaked distributions, so greedy choices are not decided by float rounding.
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128, bos_token_id=60, eos_token_id=61,
                   pad_token_id=62, init_std=0.5)
# Byte-vocab twin for the CLIs and the eval tasks (byte tokenizer: vocab 260).
TINY_BYTE = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=256, init_std=0.5)


@functools.lru_cache(maxsize=None)
def tiny(cfg: ModelConfig = TINY, seed: int = 0):
    """(cfg, params): the tree of a3jax.model.init_params, each param drawn per its spec in the param
    table but with numpy (flax's init runs the model op by op, which costs tens of seconds on a loaded
    2-core machine)."""
    rng = np.random.default_rng(seed)

    def draw(spec):  # in sorted-name order, so the numbers do not depend on the table's order
        if spec.init == ONES:
            return jnp.ones(spec.shape, jnp.float32)
        if spec.init != NORMAL:
            return None  # the query vector, made from the embedding below
        return jnp.asarray(rng.normal(0.0, cfg.init_std, spec.shape), jnp.float32)

    params = jax.tree.map(draw, param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    params["query_embed"] = query_embed_init(cfg, params["embed"])
    return cfg, params


def batch(b=3, t=20, n_blank=9, seed=0, vocab=60):
    """tokens [b, t] and known [b, t] with exactly n_blank blanks per row (position 0 always known)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    known = np.ones((b, t), bool)
    for r in range(b):
        known[r, 1 + rng.choice(t - 1, n_blank, replace=False)] = False
    return tokens, known
