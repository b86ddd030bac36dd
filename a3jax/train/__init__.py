"""Training: state + optimizer (state.py), loss (loss.py), jitted step (step.py), metrics / MFU and
the log window (metrics.py), the loop (trainer.py), `a3jax train` (cli.py) and `a3jax plot`
(plot.py); run checkpoints are a3jax.checkpoint.run. See docs/train.md.

    from a3jax.train import train
    final = train(cfg)          # cfg: a3jax.config.Config; resumes from cfg.run_dir if it has checkpoints
"""
__all__ = ["train", "NonFiniteLossError"]


def __getattr__(name):
    # The trainer (data, checkpoints, metrics) loads on first use, so that a3jax.train.loss, which
    # the objective table (a3jax.objectives) builds on, imports without it.
    if name in __all__:
        from a3jax.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'a3jax.train' has no attribute {name!r}")
