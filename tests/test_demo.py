"""The main job end to end at a reduced size, and the README's promises (commands, config keys)."""
import json
import math
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from a3jax.demo import run

    run_dir = str(tmp_path_factory.mktemp("demo") / "run")
    overrides = [f"run_dir={run_dir}", 'data.stages=[{ar: 3}, {"blocks:2": 2}, {"random:4": 3}]',
                 "train.eval_every=4", "train.log_every=1", "checkpoint.every=4", "data.max_documents=60",
                 "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
                 "model.num_heads=4", "model.num_kv_heads=2"]
    report = run(os.path.join(ROOT, "configs", "demo.yaml"), overrides, infill_count=3, show=1)
    return run_dir, overrides, report


def test_demo_artifacts(demo_run):
    from a3jax.checkpoint import load_params

    run_dir, _, report = demo_run
    # Final params checkpoint restores and has the demo's model.
    cfg, params = load_params(os.path.join(run_dir, "final"))
    assert cfg.num_layers == 2 and params["layers"]["wq"].shape[0] == 2
    # metrics.jsonl has train lines from every curriculum stage.
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    stages = {l.get("stage") for l in lines if "loss" in l and l.get("stage") is not None}
    assert stages == {0, 1, 2}, stages
    # TensorBoard events and the loss PNG.
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(run_dir) for f in fs)
    with open(report["loss_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Infilling filled every blank, touched no known token, for each order.
    for order, r in report["infill"].items():
        assert r["unfilled"] == 0 and r["changed_known"] == 0, (order, r)
        assert 0.0 <= r["exact_chars"] <= 1.0 and r["samples"]
    # Exact log-likelihoods are finite and per-token values are plausible for a byte model.
    for strat, r in report["log_likelihood"].items():
        assert math.isfinite(r["nats_per_token"]) and 0 < r["nats_per_token"] < math.log(260) + 1, (strat, r)
    assert os.path.exists(os.path.join(run_dir, "demo_report.json"))


def test_demo_rerun_resumes_instead_of_starting_over(demo_run, capsys):
    from a3jax.demo import run

    run_dir, overrides, report = demo_run
    before = sum(1 for _ in open(os.path.join(run_dir, "metrics.jsonl")))
    again = run(os.path.join(ROOT, "configs", "demo.yaml"), overrides, infill_count=1, show=0)
    out = capsys.readouterr().out
    assert "resumed from checkpoint 8" in out
    assert again["train"]["step"] == 8
    # No training step was logged again.
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))][before:]
    assert not [l for l in lines if "loss" in l and "eval" not in str(l.get("kind", ""))], lines


def test_show_masks_png(tmp_path):
    from a3jax.show_masks import cli_main

    out = tmp_path / "m.png"
    assert cli_main(["--groups", "0 0 1 2 2 1", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    out2 = tmp_path / "s.png"
    assert cli_main(["--strategy", "random:2", "--length", "8", "--sorted", "--out", str(out2)]) == 0
    assert out2.stat().st_size > 1000
    assert cli_main(["--groups", "0 x", "--out", str(out)]) == 2


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_starts_with_the_two_commands():
    text = _readme()
    first = [m.group(1) for m in re.finditer(r"^\s+make (\w+)", text, re.M)][:2]
    assert first == ["demo", "test"]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()
    with open(os.path.join(ROOT, "Makefile")) as f:
        mk = f.read()
    assert re.search(r"^demo:", mk, re.M) and re.search(r"^test:", mk, re.M)


def test_readme_commands_and_config_keys_exist():
    from a3jax.cli import COMMANDS
    from a3jax.config import Config, ConfigError, apply_overrides, build

    text = _readme()
    cmds = set(re.findall(r"\ba3jax ([a-z][a-z-]+)", text))
    assert {"train", "convert", "infill"} <= cmds, f"the README's commands were not found: {sorted(cmds)}"
    for c in cmds:
        assert c in COMMANDS, f"README mentions `a3jax {c}` but the CLI has no such command"
    # Every key=value override written after `a3jax train` parses against the config dataclasses.
    for line in re.findall(r"a3jax train ([^\n]+(?:\\\n[^\n]+)*)", text):
        words = line.replace("\\\n", " ").split()
        overrides = [w for w in words[1:] if "=" in w and not w.startswith("-")]
        for ov in overrides:
            key = ov.split("=", 1)[0]
            if key in ("model", "data"):  # section-file references: the file must exist
                name = ov.split("=", 1)[1]
                assert os.path.exists(os.path.join(ROOT, "configs", key if key == "model" else "", name + ".yaml")) \
                    or os.path.exists(os.path.join(ROOT, "configs", name + ".yaml")), ov
                continue
            try:
                build(Config, apply_overrides({}, [ov]))
            except ConfigError as e:
                if "unknown key" in str(e) or "must be" in str(e):
                    raise AssertionError(f"README override {ov!r}: {e}")
    # Every config file the README names exists.
    for path in re.findall(r"(configs/[\w./-]+\.yaml)", text):
        assert os.path.exists(os.path.join(ROOT, path)), path
    for path in re.findall(r"(launch/[\w./-]+)", text):
        assert os.path.exists(os.path.join(ROOT, path)), path
    for path in re.findall(r"\((docs/[\w./-]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_config_reference_is_generated_and_complete():
    import dataclasses

    from a3jax.config_reference import SECTIONS, field_comments, reference_markdown

    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read().strip() == reference_markdown().strip(), \
            "docs/config.md is stale: run `python -m a3jax.config_reference > docs/config.md`"
    for _, cls in SECTIONS:
        missing = [f.name for f in dataclasses.fields(cls) if not field_comments(cls).get(f.name)]
        assert not missing, f"{cls.__name__}: no meaning documented for {missing}"
