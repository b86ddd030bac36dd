"""Checkpoints, two kinds (docs/checkpoints.md):

    a3jax.checkpoint.params   params-only checkpoints: params + model.yaml + tokenizer files (`a3jax
                              convert` and `a3jax export` output, model.init_from, decoding):
                              save_params, load_params, param_targets, ...; load_params and
                              load_model_config read a run directory's latest checkpoint as well
    a3jax.checkpoint.run      run checkpoints: everything a training run needs to continue (state,
                              data iterator, config, progress): RunCheckpoints, check_compatible
    a3jax.checkpoint.export   export_run: a run's params -> a params checkpoint with its tokenizer
    a3jax.checkpoint.tokenizer  the tokenizer files that travel with every params checkpoint;
                              tokenizer_spec(ckpt) is what `--tokenizer auto` loads

    from a3jax.checkpoint import save_params, load_params
    save_params("ckpt/x", cfg, params); cfg, params = load_params("ckpt/x", mesh, rules)

Nothing here imports a3jax.train (the trainer imports this package).
"""
from a3jax.checkpoint.params import (MODEL_YAML, PARAMS_ITEM, CheckpointError, check_against_config,
                                     is_params_checkpoint, load_model_config, load_params, param_targets,
                                     save_params)
from a3jax.checkpoint.run import ARCH_FIELDS, RunCheckpoints, check_compatible, is_run_dir, run_steps
from a3jax.checkpoint.tokenizer import TOKENIZER_FILES, copy_tokenizer, copy_tokenizer_files, tokenizer_spec
from a3jax.checkpoint.export import export_run

__all__ = ["save_params", "load_params", "load_model_config", "param_targets", "is_params_checkpoint",
           "check_against_config", "CheckpointError", "PARAMS_ITEM", "MODEL_YAML",
           "RunCheckpoints", "check_compatible", "ARCH_FIELDS", "is_run_dir", "run_steps",
           "export_run", "tokenizer_spec", "copy_tokenizer", "copy_tokenizer_files", "TOKENIZER_FILES"]
