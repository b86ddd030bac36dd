"""Every code example of README.md and docs/*.md marked runnable runs, on a tiny random-init model.

A block is marked by an HTML comment on the line before its fence (invisible on GitHub):

    <!-- runnable -->
    ```bash
    a3jax --help
    ```

Each marked block runs in a fresh directory holding `runs/demo/final` (a tiny A3 params checkpoint
made with a3jax's own init_params + save_params, standing in for what `make demo` writes there) and
`configs/` (the repository's). Shell blocks run under `bash -euo pipefail` with `a3jax` meaning
`python -m a3jax`; Python blocks run as a script. docs/index.md documents the convention.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- runnable -->"
LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
CKPT = os.path.join("runs", "demo", "final")
TIMEOUT_S = 120


def doc_files() -> list:
    docs = os.path.join(ROOT, "docs")
    return ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))


def scan(rel: str):
    """(examples, problems) of one file: examples as (id, kind, code); problems as messages."""
    lines = open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines()
    examples, problems = [], []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        where = f"{rel}:{i + 1}"
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        m = re.fullmatch(r"```(\w+)", fence)
        if not m or m.group(1) not in LANGS:
            problems.append(f"{where}: {MARKER} must be followed by a ```bash or ```python fence, "
                            f"found {fence!r}")
            continue
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            problems.append(f"{where}: the fence is never closed")
            continue
        examples.append((f"{rel}:{i + 2}", LANGS[m.group(1)], "\n".join(lines[i + 2:end]) + "\n"))
    return examples, problems


EXAMPLES, PROBLEMS = [], []
for _rel in doc_files():
    _ex, _pr = scan(_rel)
    EXAMPLES += _ex
    PROBLEMS += _pr


def test_markers_are_well_formed_and_examples_exist():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    kinds = {kind for _, kind, _ in EXAMPLES}
    assert kinds == {"shell", "python"}, f"expected runnable shell and python examples, found {kinds}"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random-init A3 params checkpoint (byte vocabulary) written with a3jax's own API."""
    import jax

    from a3jax.checkpoint import save_params
    from a3jax.config import ModelConfig
    from a3jax.model import init_params

    cfg = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256)
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(0))  # jitted: eager init is slow
    path = str(tmp_path_factory.mktemp("docs_ckpt") / "final")
    save_params(path, cfg, params)
    return path


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> dict:
    """The examples' shared persistent compilation cache (as environment variables): README's and
    getting-started's commands decode the same checkpoint in the same shapes, so a later example
    loads the programs an earlier one compiled. Cached programs are the same programs."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("docs_jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _workdir(tmp_path, ckpt: str) -> str:
    os.makedirs(tmp_path / "runs" / "demo")
    shutil.copytree(ckpt, tmp_path / CKPT)  # a copy: an example may overwrite it
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    return str(tmp_path)


# Examples that decode with the model (each command a fresh process that compiles its decode loops)
# are the slow ones: `make test-fast` leaves them out, the full leg runs them.
DECODES = re.compile(r"\b(generate|infill|score|Engine)\b")


@pytest.mark.parametrize("where,kind,code", [
    pytest.param(*e, id=e[0], marks=[pytest.mark.slow] if DECODES.search(e[2]) else []) for e in EXAMPLES])
def test_example_runs(where, kind, code, tiny_checkpoint, compile_cache, tmp_path):
    cwd = _workdir(tmp_path, tiny_checkpoint)
    env = dict(os.environ, JAX_PLATFORMS="cpu", A3JAX_PYTHON=sys.executable, **compile_cache,
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if kind == "shell":
        script = ('a3jax() { "$A3JAX_PYTHON" -m a3jax "$@"; }\n'
                  'python() { "$A3JAX_PYTHON" "$@"; }\n' + code)
        cmd = ["bash", "-euo", "pipefail", "-c", script]
    else:
        cmd = [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, (f"{where}: the example exited {r.returncode}\n--- code\n{code}"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


def test_cli_reference_is_generated():
    """docs/cli.md is what `python -m a3jax.cli_reference` prints from the commands' own parsers."""
    from a3jax import cli
    from a3jax.cli_reference import reference_markdown

    text = reference_markdown()
    for name in cli.COMMANDS:
        assert f"## a3jax {name}\n" in text and f"usage: a3jax {name}" in text, name
    with open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8") as f:
        assert f.read() == text, "docs/cli.md is stale: run `python -m a3jax.cli_reference > docs/cli.md`"


def _text_files():
    yield "README.md"
    for top in ("docs", "a3jax", "bench", "tests"):
        for root, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in sorted(files):
                if f.endswith((".md", ".py", ".yaml", ".json", ".sh", ".txt")):
                    yield os.path.relpath(os.path.join(root, f), ROOT)


def test_no_diary_markers_in_docs_code_bench_tests():
    """Docs, code, benchmarks and tests say what things are, not which issue or session made them,
    and name no machine paths."""
    pattern = re.compile(r"\b(" + "issue|session" + r") [0-9]+\b|/" + "work/", re.IGNORECASE)
    hits = []
    for rel in _text_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as fh:
            hits += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(fh, 1) if pattern.search(line)]
    assert not hits, "diary markers or machine paths:\n" + "\n".join(hits)
