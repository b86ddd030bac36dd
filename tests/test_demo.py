"""The main job end to end at a reduced size, and the README's promises (commands, config keys)."""
import json
import math
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY = ["train.eval_every=4", "train.log_every=1", "checkpoint.every=4", "data.max_documents=60",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=4",
        "model.num_kv_heads=2", "pretrain:data.stages=[{ar: 4}]",
        'adapt:data.stages=[{ar: 2}, {"random:4": 2}, {"infill:0.25:8:1:random:repeat": 1}]',
        "tasks:examples=100", "tasks:eval_count=2", "tasks:both_count=2"]
EVAL = dict(infill_count=3, show=1, eval_batches=1, group_sizes=(1,), gen_prompts=2, gen_tokens=5,
            parallel_settings=("group:1",),  # the other settings: the same code path, more compiles
            any_order_settings=("all_at_once",))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from a3jax.demo import run

    out = str(tmp_path_factory.mktemp("demo") / "out")
    report = run(os.path.join(ROOT, "configs", "demo"), TINY, out, **EVAL)
    return out, report


@pytest.mark.slow
def test_demo_phases_pretrain_ar_export_hf_adapt_a3(demo_run):
    from a3jax.checkpoint import load_params
    from a3jax.config import load_config

    out, report = demo_run
    pre_cfg, _ = load_params(os.path.join(out, "pretrain", "final"))
    assert pre_cfg.objective == "ar" and pre_cfg.num_layers == 2
    # The adaptation starts from the HF directory, converted back: a transformers-style LLaMA dir.
    hf = json.load(open(os.path.join(out, "hf", "config.json")))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["num_hidden_layers"] == 2
    adapt = load_config(os.path.join(out, "adapt", "config.yaml"))
    assert adapt.model.init_from == os.path.join(out, "base") and adapt.train.objective == "a3"
    cfg, params = load_params(os.path.join(out, "final"))
    assert cfg.objective == "a3" and params["layers"]["wq"].shape[0] == 2
    # Per phase: steps, tokens, seconds, final train loss; every command printed is a real CLI line.
    ph = report["phases"]
    assert (ph["pretrain"]["steps"], ph["adapt"]["steps"]) == (4, 5)
    assert ph["pretrain"]["tokens"] == 4 * 16 * 128 and ph["pretrain"]["objective"] == "ar"
    for k in ("pretrain", "adapt"):
        assert math.isfinite(ph[k]["final_train_loss"]) and ph[k]["seconds"] > 0 and ph[k]["trained_now"]
    from a3jax.cli import COMMANDS
    for c in report["commands"].values():
        assert c.split()[1] in COMMANDS, c
    assert report["commands"]["a3_to_hf"].startswith("a3jax convert a3-to-hf --ckpt ")
    # The loss PNG (both phases) and the parallel decoding PNG.
    for png in (report["loss_png"], report["parallel_png"]):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_report_schema_and_invariants(demo_run):
    out, report = demo_run
    assert json.load(open(os.path.join(out, "demo_report.json")))["seconds"] == pytest.approx(report["seconds"])
    held = report["heldout"]
    values = [held["pretrained"]["ar"]["nats_per_byte"]] + [held["a3"][k]["nats_per_byte"]
                                                             for k in ("ar", "random:4", "infill")]
    assert all(0 < v < math.log(260) + 1 for v in values), values
    inf = report["infill"]
    for order in ("left_to_right", "confidence", "random", "prefix_only"):
        assert 0.0 <= inf[order]["exact_chars"] <= 1.0 and 0.0 <= inf[order]["rougeL"] <= 1.0, order
    for order in ("left_to_right", "confidence", "random"):
        assert inf[order]["unfilled"] == 0 and inf[order]["changed_known"] == 0, (order, inf[order])
    assert inf["benchmark"]["count"] == len(inf["samples"]) == 3
    par = report["parallel"]
    assert set(par) == {"group:1"}
    blank = max(len(s["truth"]) for s in inf["samples"])
    g1 = par["group:1"]
    assert g1["steps"] == blank and g1["tokens_per_s"] > 0  # one blank per step
    assert g1["generate"]["steps"] == 5 and 0 < g1["generate"]["nll_per_token"] < math.log(260) + 1
    assert report["targets"]["met"].keys() == {"heldout_ar", "infill_ratio", "infill_exact", "seconds"}
    # The any-order tasks: per task, blank kind and decoder an exact match, the chance level, the count.
    anyo = report["any_order"]
    assert set(anyo) == {"mirror", "tag", "brackets"}
    for task, kinds in anyo.items():
        assert set(kinds) == {"right_context", "prefix_suffices"}, task
        for kind, r in kinds.items():
            assert set(r["exact_match"]) == {"left_to_right", "confidence", "random", "prefix_only"}
            assert all(0.0 <= v <= 1.0 for v in r["exact_match"].values()) and r["count"] == 2, (task, kind, r)
            low, high = dict(brackets=(0.25, 0.25), mirror=(26.0 ** -3, 26.0 ** -3), tag=(26.0 ** -5, 26.0 ** -3))[task]
            assert low * (1 - 1e-9) <= r["chance"] <= high * (1 + 1e-9), (task, kind, r["chance"])
    assert set(report["targets"]["any_order"]) == set(anyo)
    # All blanks at once: one model pass per answer, for the right-context answers and the mirrored pairs.
    ap = report["any_order_parallel"]
    assert set(ap) == {"all_at_once"} and ap["all_at_once"]["passes"] == 1.0
    assert ap["all_at_once"]["both"]["passes"] == 1.0 and ap["all_at_once"]["both"]["count"] == 2
    with open(report["any_order_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_infill_benchmark_is_fixed_and_its_blanks_need_the_right_context():
    from a3jax.demo import infill_benchmark

    items = infill_benchmark(128, 0.05, count=12)
    assert items == infill_benchmark(128, 0.05, count=12)  # seeded: the same blanks every run
    assert {it["kind"] for it in items} == {"name", "args"}
    for it in items:
        text, a, b = it["text"], it["start"], it["end"]
        span = text[a:b]
        assert len(text) + 2 <= 128 and 3 <= len(span) <= 16 and "\n" not in span, it
        if it["kind"] == "name":
            # the first occurrence of a name the rest of the function uses: absent before, present after
            assert span.isidentifier() and re.search(rf"\b{span}\b", text[b:]), it
            assert not re.search(rf"\b{span}\b", text[:a]), it
        else:
            assert text[a - 1] == "(" and text[b] == ")", it


@pytest.mark.slow
def test_span_nll_scores_the_layout_the_benchmark_decodes(demo_run):
    """The span NLL (scorer) and the benchmark's fills (decoder) see the context grouped the same way:
    the decoder's teacher-forced log-probs of the true spans, left to right, sum to the scorer's."""
    from a3jax import demo
    from a3jax.checkpoint import load_params
    from a3jax.data import load_tokenizer
    from a3jax.data.rows import blank_rows, placeholder_id
    from a3jax.decode import DecodeSpec, infill

    out, _ = demo_run
    cfg, params = load_params(os.path.join(out, "final"))
    pre_cfg, pre_params = load_params(os.path.join(out, "pretrain", "final"))
    tok = load_tokenizer("byte")
    items = demo.infill_benchmark(128, 0.05, count=3)
    got = demo.span_nll(pre_cfg, pre_params, cfg, params, tok, items)
    rows = [([tok.bos_id] + list(tok.encode(it["text"])), 1 + it["start"], it["end"] - it["start"]) for it in items]
    tokens, known, valid = blank_rows(rows, max(len(r[0]) for r in rows), tok.pad_id, placeholder_id(tok))
    for r, (ids, _, _) in enumerate(rows):  # teacher forcing commits the true tokens at the blanks
        tokens[r, :len(ids)] = ids
    lp = {}
    for chunk in (demo.CONTEXT_GROUP_SIZE, 0):  # 0: the whole context in one group
        res = infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", group_size=1,
                                                            prompt_group_size=chunk, teacher_forcing=True), valid=valid)
        lp[chunk] = -float(res.logprobs[~known & valid].sum()) / got["bytes"]
    assert got["bytes"] == sum(n for _, _, n in rows)
    assert got["a3_both_sides"] == pytest.approx(lp[demo.CONTEXT_GROUP_SIZE], rel=1e-4)
    assert abs(lp[0] - lp[demo.CONTEXT_GROUP_SIZE]) > 1e-4  # the grouping is not a no-op


@pytest.mark.slow
def test_final_records_its_context_layout_and_generate_defaults_to_it(demo_run, capsys):
    """The adaptation ends in an infilling stage, whose context is left to right one token per group:
    final/ records that layout and `a3jax generate` (the README's command) decodes with it by default."""
    from a3jax.checkpoint import load_model_config
    from a3jax.cli import main
    from a3jax.decode import DecodeSpec, Engine

    out, _ = demo_run
    final = os.path.join(out, "final")
    assert load_model_config(final).prompt_group_size == 1
    assert load_model_config(os.path.join(out, "pretrain", "final")).prompt_group_size == 0  # ar: no layout
    capsys.readouterr()
    assert main(["generate", "--ckpt", final, "--prompt", "def fib(n):", "--max-new-tokens", "12",
                 "--color", "never"]) == 0
    printed = capsys.readouterr().out
    eng = Engine.load(final)
    want = eng.generate(["def fib(n):"], 12, DecodeSpec(prompt_group_size=1))[0].text
    other = eng.generate(["def fib(n):"], 12, DecodeSpec(prompt_group_size=0))[0].text
    assert want in printed, (want, other, printed)


@pytest.mark.slow
def test_next_commands_are_what_the_cli_prints(demo_run, capsys):
    """The demo runs the three commands it prints (infill on a task, sampled code, a score) and
    records their output: the same as a user's by-hand run. Whether it is sensible is for the trained
    demo model (docs/demo.md records it); this tiny model's outputs only have the right shape."""
    import shlex

    from a3jax.cli import main

    out, report = demo_run
    nxt = report["next_commands"]
    assert [r["kind"] for r in nxt] == ["infill", "generate", "score"] and all(r["rc"] == 0 for r in nxt)
    for r in nxt:
        assert os.path.join(out, "final") in r["command"]
        capsys.readouterr()
        assert main(shlex.split(r["command"])[1:] + (["--color", "never"] if r["kind"] != "score" else [])) == 0
        assert capsys.readouterr().out == r["output"], r
    assert re.fullmatch(r"<.+>abc</span>\n", nxt[0]["output"], re.S), nxt[0]
    assert nxt[1]["output"].startswith("def ")
    assert len(re.findall(r"^\s+\d+\s+\d+\s+-[\d.]+", nxt[2]["output"], re.M)) == 2, nxt[2]


def test_sensible_holds_the_outputs_a_newcomer_should_see():
    from a3jax.demo import sensible

    assert sensible("infill", "<span>abc</span>\n") and not sensible("infill", "<spam>abc</span>\n")
    assert sensible("generate", "def foo(self, name):\n    return self._x\n")
    assert not sensible("generate", "def " + " " * 40) and not sensible("generate", "def \x00\x01abcdefghij")
    table = ("  # tokens      log-lik  nll/tok        ppl bits/byte\n"
             "  0      18      -20.000   1.1111      3.000    1.6000\n"
             "  1      18      -40.000   2.2222      9.000    3.2000\ntotal: ...\n")
    assert sensible("score", table) and not sensible("score", table.replace("-20.000", "-50.000"))


@pytest.mark.slow
def test_demo_rerun_resumes_every_phase_and_rewrites_the_report(demo_run, capsys):
    from a3jax.demo import run

    out, report = demo_run
    before = sum(1 for _ in open(os.path.join(out, "pretrain", "metrics.jsonl")))
    before_ad = sum(1 for _ in open(os.path.join(out, "adapt", "metrics.jsonl")))
    mtime = os.path.getmtime(os.path.join(out, "base", "model.yaml"))
    again = run(os.path.join(ROOT, "configs", "demo"), TINY, out, **EVAL)
    text = capsys.readouterr().out
    assert "resumed from checkpoint 4" in text and "resumed from checkpoint 5" in text
    assert not again["phases"]["pretrain"]["trained_now"] and not again["phases"]["adapt"]["trained_now"]
    assert "(done: kept)" in text and os.path.getmtime(os.path.join(out, "base", "model.yaml")) == mtime
    for name, n in (("pretrain", before), ("adapt", before_ad)):
        new = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))][n:]
        assert not [l for l in new if "loss" in l and l.get("kind") != "eval"], (name, new)
    assert json.load(open(os.path.join(out, "demo_report.json")))["seconds"] == pytest.approx(again["seconds"])
    assert again["infill"]["samples"] == report["infill"]["samples"]  # same model, same fixed blanks


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


def test_readme_shows_the_commands_the_demo_prints_and_checks():
    """The README's examples on the demo model are the ones the demo runs and checks for sensible output."""
    from a3jax.demo import next_commands

    text = _readme()
    for _, cmd in next_commands("runs/demo/final"):
        assert cmd in text, cmd
