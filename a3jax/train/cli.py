"""`a3jax train CONFIG.yaml key=value ...` (MaxText style overrides, e.g. train.steps=100 run_dir=runs/x)."""
from __future__ import annotations

import argparse
import sys

from a3jax.config import ConfigError, load_config, split_config_args
from a3jax.distributed import DistributedError, initialize, is_main_process
from a3jax.fs import StorageError
from a3jax.train.trainer import NonFiniteLossError, train

USAGE = """\
usage: a3jax train [CONFIG.yaml] [key.sub=value ...]

Trains (or resumes) the run described by CONFIG.yaml plus overrides. Rerunning the same command
resumes from the latest complete checkpoint under RUN_DIR/checkpoints (any mesh shape).

examples:
  a3jax train configs/base.yaml run_dir=runs/tiny train.steps=200
  a3jax train configs/base.yaml model=llama3.2-1b model.init_from=ckpt/llama1b mesh.fsdp=-1
  a3jax train configs/base.yaml data=curriculum/paper train.global_batch_size=256 train.microbatches=4

multi-process: set A3JAX_COORDINATOR, A3JAX_NUM_PROCESSES, A3JAX_PROCESS_ID (or run under SLURM or
on a TPU VM) and start the same command in every process; see docs/launch.md and launch/.

exit status: 0 done; 1 config/data error or non-finite loss; 128+N after saving on signal N.
See docs/train.md for every key.
"""


def cli_main(argv, hooks=()) -> int:
    """`a3jax train`; hooks (a3jax.train.hooks.Hook) go to `train` (a program that wraps the CLI adds
    behaviour, e.g. a pause after every step, without a flag)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    parser = argparse.ArgumentParser(prog="a3jax train", usage=USAGE, add_help=False)
    parser.add_argument("args", nargs="*")
    parser.add_argument("--no-progress", action="store_true", help="one line per log step, no tqdm bar")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="save a checkpoint and exit once this many steps are done (split a run into jobs)")
    ns = parser.parse_args(argv)
    try:
        path, overrides = split_config_args(ns.args)
    except ConfigError as e:
        print(f"a3jax train: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"a3jax train: {e}", file=sys.stderr)
        return 1
    try:
        initialize()  # multi-process pods / SLURM / launch/local.sh; single process when nothing is set
    except DistributedError as e:
        print(f"a3jax train: {e}", file=sys.stderr)
        return 1
    try:
        result = train(cfg, progress_bar=False if ns.no_progress else None, stop_at_step=ns.stop_at_step,
                       hooks=hooks)
    except (ConfigError, NonFiniteLossError, StorageError, FileNotFoundError) as e:
        print(f"a3jax train: {e}", file=sys.stderr)
        return 1
    if result.get("interrupted"):
        return 128 + int(result["interrupted"])
    if is_main_process():
        print(f"[a3jax train] done: step {result['step']} loss {result['loss']:.4f}"
              + "".join(f" eval[{k}] {v:.4f}" for k, v in (result.get("eval") or {}).items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
