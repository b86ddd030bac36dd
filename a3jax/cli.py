"""`a3jax <command> ...` (also `python -m a3jax`). Each command lives in its own module and is
imported only when used, so `a3jax --help` stays fast and no command pays for another's imports."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

# distributed.py imports JAX only inside its functions, so this stays cheap for `a3jax --help`.
from a3jax.distributed import DistributedError, initialize, tpu_chips_present

# command -> (module, function, one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "convert": ("a3jax.convert.cli", "cli_main", "convert weights (a3jax convert SUBCOMMAND --help):"),
    "train": ("a3jax.train.cli", "cli_main", "train with the curriculum: a3jax train CONFIG.yaml key=value ..."),
    "rl": ("a3jax.posttrain.cli", "cli_main", "GRPO post-training with exact log-probs: a3jax rl CONFIG.yaml key=value ..."),
    "export": ("a3jax.checkpoint.export", "cli_main", "a run's params -> a params checkpoint + tokenizer: export RUN_DIR OUT"),
    "generate": ("a3jax.decode.cli", "generate_main", "continue a prompt with KV-cached group decoding"),
    "infill": ("a3jax.decode.cli", "infill_main", "fill [MASK:n] blanks in a text"),
    "score": ("a3jax.decode.score_cli", "score_main", "exact log-likelihood of texts under a grouping"),
    "eval": ("a3jax.eval.cli", "cli_main", "evaluate on JSONL tasks (multiple choice, infilling, QA, perplexity)"),
    "data": ("a3jax.data.prepare", "cli_main", "data tools: a3jax data prepare --source ... --out DIR"),
    "bench": ("a3jax.bench_cli", "cli_main", "run a benchmark script from bench/"),
    "compile": ("a3jax.compile", "cli_main", "compile the train/decode step for a TPU topology on this host"),
    "plot": ("a3jax.train.plot", "cli_main", "draw a run's loss curves into a PNG"),
    "show-masks": ("a3jax.show_masks", "cli_main", "render the content and query masks of a grouping as a PNG"),
    "serve": ("a3jax.serve.cli", "cli_main", "OpenAI-compatible HTTP server with continuous batching"),
    "demo": ("a3jax.demo", "cli_main", "the main job on the embedded default (make demo)"),
}

def subcommands() -> dict:
    """Subcommands listed under their command in `a3jax --help`: each command's parser owns its table
    (a test holds them equal). Imported only when the help is printed."""
    from a3jax.convert.cli import SUBCOMMANDS as convert_subcommands
    return {"convert": convert_subcommands}


# Commands that run on devices join the multi-process job first (a3jax.distributed: TPU pod, SLURM,
# A3JAX_* variables; a single process when none is set). `train` does it itself, after its config.
DEVICE_COMMANDS = {"generate", "infill", "score", "eval", "serve", "rl", "demo"}


def usage() -> str:
    lines = ["usage: a3jax <command> [args]  (a3jax <command> --help for details)", "", "commands:"]
    subs = subcommands()
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<11} {help_}")
        lines += [f"    {sub:<16} {sub_help}" for sub, sub_help in subs.get(name, {}).items()]
    return "\n".join(lines)


def skip_absent_tpu() -> None:
    """With libtpu installed (requirements-dev.txt has it for `a3jax compile`) but no TPU chips here,
    JAX would still probe the TPU backend and libtpu would log worker/metadata errors on every command.
    Leave the TPU out of the platforms then; an explicit JAX_PLATFORMS always wins."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if tpu_chips_present():
        return
    cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
    if "jax" in sys.modules:  # the chip probe imported jax, which read JAX_PLATFORMS already
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"a3jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if name in DEVICE_COMMANDS and not any(a in ("-h", "--help") for a in rest):
        try:
            initialize()
        except DistributedError as e:
            print(f"a3jax {name}: {e}", file=sys.stderr)
            return 1
    return int(getattr(importlib.import_module(module), func)(rest) or 0)
