"""RUN_DIR/final/: what a finished run hands on, a params checkpoint (a3jax.checkpoint.save_params: the
format of `a3jax convert` output, `--ckpt` and `model.init_from`) with the tokenizer files beside it,
the same files `a3jax export RUN_DIR OUT` writes from a run's checkpoint."""
from __future__ import annotations

import jax

from a3jax import fs
from a3jax.checkpoint import copy_tokenizer, save_params
from a3jax.config import Config

FINAL_DIR = "final"


def write_final(cfg: Config, params, run_dir: str) -> str:
    """Writes RUN_DIR/final (params + model.yaml + tokenizer files), replacing an older one. Every process
    calls it (Orbax writes from all of them); process 0 copies the tokenizer. Returns its path."""
    out = fs.join(run_dir, FINAL_DIR)
    save_params(out, cfg.model, params, force=True)
    if jax.process_index() == 0:
        copy_tokenizer(cfg.data.tokenizer, out)
    return out
