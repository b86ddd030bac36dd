"""`a3jax rl CONFIG.yaml key=value ...`: GRPO from a shipped or user config (docs/post-training.md)."""
from __future__ import annotations

import argparse
import sys

from a3jax.config import ConfigError, split_config_args


def cli_main(argv, hooks=()) -> int:
    """`a3jax rl`; hooks (callables (rl_step, metrics record) run after every RL step) go to the loop
    (a program that wraps the CLI adds them)."""
    p = argparse.ArgumentParser(prog="a3jax rl", description="GRPO with exact log-probs (A3) or the one-step "
                                "estimate (mdlm): a3jax rl CONFIG.yaml key=value ... (configs/rl/, "
                                "docs/post-training.md). Resumes from RUN_DIR/checkpoints when present.")
    p.add_argument("args", nargs="*", help="CONFIG.yaml and key.sub=value overrides")
    ns = p.parse_args(argv)
    from a3jax.posttrain import config as config_lib
    from a3jax.posttrain import loop, rewards
    from a3jax.posttrain.policy import PolicyError
    from a3jax.posttrain.rollout import RolloutError
    try:
        path, overrides = split_config_args(ns.args)
        cfg = config_lib.load(path, overrides)
        loop.run(cfg, hooks=hooks)
    except (ConfigError, rewards.RewardError, loop.DataError, PolicyError, RolloutError) as e:
        print(f"a3jax rl: {e}", file=sys.stderr)
        return 1
    return 0
