"""`a3jax export RUN_DIR OUT`: a training run's params as a params checkpoint with its tokenizer beside
them, the format every command's `--ckpt` and `model.init_from` read (docs/checkpoints.md)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

import jax

from a3jax import fs
from a3jax.checkpoint.params import CheckpointError, load_params, save_params
from a3jax.checkpoint.run import is_run_dir, resolve_step, run_config_dict
from a3jax.checkpoint.tokenizer import BYTE_SPECS, copy_tokenizer


def export_run(run_dir: str, out: str, step: Optional[int] = None) -> str:
    """Writes checkpoint `step` (default: the latest complete one) of the run in run_dir as a params
    checkpoint in `out` (overwritten), with the run's tokenizer files beside it. Returns out's path."""
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir}: not a training run (no checkpoints/ in it; `a3jax train` writes one)")
    step = resolve_step(run_dir, step)
    saved = run_config_dict(run_dir, step)
    tokenizer = str(saved.get("data", {}).get("tokenizer", "byte"))
    if tokenizer not in BYTE_SPECS and not fs.exists(tokenizer):
        # a params checkpoint without it would decode with bytes: refuse before writing anything
        raise CheckpointError(f"{run_dir}: the run's tokenizer {tokenizer} (data.tokenizer) is not found "
                              f"from here; run the export where that path exists")
    # The run keeps fp32 master weights: they are written as they are (model.yaml keeps the run's
    # param_dtype, which casts on load), so a model trained on from the export starts from the same values.
    run_dtype = saved.get("model", {}).get("param_dtype", "float32")
    cfg, params = load_params(run_dir, host=True, step=step, dtype="float32")
    out = save_params(out, dataclasses.replace(cfg, param_dtype=run_dtype), params, force=True)
    if jax.process_index() == 0:
        copy_tokenizer(tokenizer, out)
    return out


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="a3jax export",
        description="A training run's params -> a params checkpoint (params/ + model.yaml + the run's "
                    "tokenizer files) for --ckpt, model.init_from and `a3jax convert a3-to-hf`. OUT is "
                    "overwritten. RUN_DIR and OUT may be gs://.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run_dir of `a3jax train`)")
    ap.add_argument("out", metavar="OUT", help="the params checkpoint directory to write")
    ap.add_argument("--step", type=int, help="the checkpoint step to export (default: the latest complete one)")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.step)
    except (CheckpointError, FileNotFoundError, fs.StorageError) as e:
        print(f"a3jax export: error: {e}", file=sys.stderr)
        return 1
    print(f"params of {args.run_dir} -> {out}")
    return 0
