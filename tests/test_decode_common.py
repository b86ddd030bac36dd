"""Shared tiny model for the decode / score / eval tests (imported by them; holds no tests itself)."""
import functools

import numpy as np

from a3jax.config import ModelConfig
from a3jax.model import numpy_init

# init_std 0.5 gives peaked distributions, so greedy choices are not decided by float rounding.
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=128, bos_token_id=60, eos_token_id=61,
                   pad_token_id=62, init_std=0.5)
# Byte-vocab twin for the CLIs and the eval tasks (byte tokenizer: vocab 260).
TINY_BYTE = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=256, init_std=0.5)


@functools.lru_cache(maxsize=None)
def tiny(cfg: ModelConfig = TINY, seed: int = 0):
    """(cfg, params): random params of the table drawn on the host (a3jax.model.numpy_init)."""
    return cfg, numpy_init(cfg, seed)


def batch(b=3, t=20, n_blank=9, seed=0, vocab=60):
    """tokens [b, t] and known [b, t] with exactly n_blank blanks per row (position 0 always known)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    known = np.ones((b, t), bool)
    for r in range(b):
        known[r, 1 + rng.choice(t - 1, n_blank, replace=False)] = False
    return tokens, known
