"""The `a3jax` command table: every command resolves, `a3jax --help` lists every command and
subcommand on a line of its own, and `a3jax bench` runs the bench/ scripts."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from a3jax.cli import COMMANDS, subcommands

SUBCOMMANDS = subcommands()
from a3jax.convert.cli import build_parser as convert_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_a_function(name):
    module, func, help_ = COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func)), f"a3jax {name}: {module}.{func}"
    assert help_


def test_help_lists_every_command_and_subcommand_one_line_each():
    r = subprocess.run([sys.executable, "-m", "a3jax", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in COMMANDS:
        assert sum(line.split()[:1] == [name] for line in lines) == 1, (name, r.stdout)
    # convert's subcommands (its parser takes each help from SUBCOMMANDS), each on one line with its help
    assert {"gguf-to-a3", "hf-to-a3", "a3-to-hf"} <= set(SUBCOMMANDS["convert"])
    for sub in SUBCOMMANDS["convert"]:
        with pytest.raises(SystemExit) as e:
            convert_parser().parse_args([sub, "--help"])
        assert e.value.code == 0, sub
        matching = [line for line in lines if line.split()[:1] == [sub]]
        assert len(matching) == 1 and len(matching[0].split()) > 3, (sub, r.stdout)
    assert "gguf-to-a3" in r.stdout and "export" in r.stdout


def _bench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "a3jax", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_bench_lists_scripts_and_names_an_unknown_one():
    r = _bench()
    assert r.returncode == 0, r.stderr
    for name in ("forward", "train", "decode", "data", "convert"):
        assert f"  {name} " in r.stdout, r.stdout
    r = _bench("no-such-bench")
    assert r.returncode == 2
    assert "'no-such-bench'" in r.stderr and "forward" in r.stderr


def test_bench_runs_a_script_with_its_arguments(tmp_path):
    out = tmp_path / "data.json"
    r = _bench("data", "--seq-len", "64", "--batch", "2", "--batches", "2", "--workers", "0",
               "--strategies", "ar", "--out", str(out), cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["strategy"], r["seq_len"], r["batch"]) for r in results] == [("ar", 64, 2)]
    assert results[0]["tokens_per_s"] > 0
