"""Shared helpers for the training tests: a tiny learnable corpus and tiny configs."""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import pytest

from a3jax.config import load_config

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def write_corpus(path: str, n_docs: int = 200, seed: int = 0) -> str:
    """JSONL of documents that are easy to learn in any order: stretches of the alphabet starting at a
    random letter (a byte model learns the successor function within a few dozen steps)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            start, n = int(rng.integers(26)), int(rng.integers(20, 60))
            text = "".join(ALPHABET[(start + i) % 26] for i in range(n))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def tiny_overrides(run_dir: str, corpus: str, **extra) -> list[str]:
    ov = {
        "run_dir": run_dir,
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
        "model.num_heads": 4, "model.num_kv_heads": 2, "model.max_position_embeddings": 64,
        "data.source": corpus, "data.seq_len": 32, "data.heldout_fraction": 0.2, "data.prefetch": 0,
        "data.stages": "[{ar: 6}, {random:4: 6}]", "data.eval_strategies": "[ar, random:4]",
        "train.global_batch_size": 8, "train.log_every": 2, "train.eval_every": 6, "train.eval_batches": 1,
        "train.optimizer.learning_rate": 3e-3, "train.optimizer.warmup_steps": 2,
        "checkpoint.every": 6, "checkpoint.max_to_keep": 5,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def tiny_config(run_dir, corpus, **extra):
    return load_config(None, tiny_overrides(str(run_dir), str(corpus), **extra))


# `a3jax train ARGS` with a pause after every step, added as a training hook: the fault tests kill a
# run reliably between two checkpoints. A pause changes no result.
_PAUSED_TRAIN = ("import sys, time; from a3jax.train.cli import cli_main; from a3jax.train.hooks import Hook; "
                 "pause = float(sys.argv[1]); "
                 "sys.exit(cli_main(sys.argv[2:], hooks=[Hook(lambda info: time.sleep(pause), every=1)]))")


def paused_train_command(pause: float, args) -> list[str]:
    """The command line of `a3jax train ARGS` pausing `pause` seconds after every step."""
    return [sys.executable, "-c", _PAUSED_TRAIN, str(pause), *args]


def wait_for(cond, proc, what, timeout=240):
    """Polls cond() while the training subprocess proc runs; fails naming `what` if it exits or times out."""
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc={proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_jsonl(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Fields of metrics.jsonl that are deterministic (everything except wall-clock timings).
EXACT_FIELDS = ("step", "kind", "stage", "strategy", "loss", "stage_loss", "accuracy", "grad_norm", "lr",
                "param_norm", "z_loss", "group_size", "tokens_seen", "skipped_nonfinite")


def exact_view(records):
    return [{k: r.get(k) for k in EXACT_FIELDS if k in r} for r in records]


def enable_compile_cache(directory: str) -> dict:
    """Turns on JAX's persistent compilation cache (in this process, and returns the env for child
    processes): the training tests compile the same tiny step many times (one per train() call and
    per subprocess); with the cache each distinct program is compiled once per session. Cached
    executables are the same programs, so results (and bit-exactness checks) are unaffected."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


# Module-scoped fixtures shared by the training test modules (import them by name there).
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "alpha.jsonl"))


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    return enable_compile_cache(str(tmp_path_factory.getbasetemp() / "jax-compile-cache"))
