"""Training: state + optimizer (state.py), jitted step (step.py), metrics / MFU and the log window
(metrics.py), the loop and its hooks (trainer.py, hooks.py), RUN_DIR/final (final.py), `a3jax train`
(cli.py) and `a3jax plot` (plot.py). The losses belong to the objectives (a3jax.objectives); run
checkpoints are a3jax.checkpoint.run. See docs/train.md.

    from a3jax.train import train
    final = train(cfg)          # cfg: a3jax.config.Config; resumes from cfg.run_dir if it has checkpoints
"""
from a3jax.train.trainer import NonFiniteLossError, train

__all__ = ["train", "NonFiniteLossError"]
