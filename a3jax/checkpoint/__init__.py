"""Checkpoints, two kinds (docs/checkpoints.md):

    a3jax.checkpoint.params   params-only checkpoints: params + model.yaml (`a3jax convert` output,
                              model.init_from, decoding): save_params, load_params, param_targets, ...
    a3jax.checkpoint.run      run checkpoints: everything a training run needs to continue (state,
                              data iterator, config, progress): RunCheckpoints, check_compatible

    from a3jax.checkpoint import save_params, load_params
    save_params("ckpt/x", cfg, params); cfg, params = load_params("ckpt/x", mesh, rules)

Nothing here imports a3jax.train (the trainer imports this package).
"""
from a3jax.checkpoint.params import (MODEL_YAML, PARAMS_ITEM, CheckpointError, check_against_config,
                                     is_params_checkpoint, load_model_config, load_params, param_targets,
                                     save_params)
from a3jax.checkpoint.run import ARCH_FIELDS, RunCheckpoints, check_compatible

__all__ = ["save_params", "load_params", "load_model_config", "param_targets", "is_params_checkpoint",
           "check_against_config", "CheckpointError", "PARAMS_ITEM", "MODEL_YAML",
           "RunCheckpoints", "check_compatible", "ARCH_FIELDS"]
