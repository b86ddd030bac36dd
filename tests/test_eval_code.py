"""The code-infilling harness: pass@k (unbiased estimator against hand-computed values), scoring fills
by execution (canonical middles pass on every benchmark, wrong ones fail), and filling through the
Engine with a tiny model in each decoder setting (A3 orders and parallel settings, prefix-only for the
content stream and ar checkpoints, mdlm's own decoder)."""
import dataclasses

import pytest

from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode.engine import Engine
from a3jax.decode.spec import DecodeSpec
from a3jax.eval import code_infill as ci
from a3jax.eval import humaneval
from a3jax.sandbox import Limits, Sandbox
from test_decode_common import TINY_BYTE, tiny

SANDBOX = Limits(timeout_s=5, cpu_s=5)


@pytest.fixture(scope="module")
def benches():
    return humaneval.all_benchmarks()


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SANDBOX, workers=2)


def test_pass_at_k_hand_computed():
    assert ci.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert ci.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)       # 1 - C(3,2)/C(5,2)
    assert ci.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)    # 1 - C(7,5)/C(10,5)
    assert ci.pass_at_k(5, 4, 2) == 1.0 and ci.pass_at_k(5, 0, 3) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        ci.pass_at_k(2, 1, 3)


def test_cut_at_suffix():
    suffix = "\n    return total\n"
    assert ci.cut_at_suffix("    total += x\n    return total\n    junk\n", suffix) == "    total += x\n"
    assert ci.cut_at_suffix("    total += x\n", suffix) == "    total += x\n"
    assert ci.cut_at_suffix("    return total\n", suffix) == "    return total\n"  # a first line is kept
    assert ci.cut_at_suffix("abc", "") == "abc"


def test_canonical_fills_score_one_and_wrong_fills_zero(benches, sandbox):
    for name, tasks in benches.items():
        sub = humaneval.subset(tasks, 8)
        good = ci.score_fills(sub, [[t.middle] for t in sub], sandbox)
        assert good["pass@1"] == 1.0 and good["n_tasks"] == 8, name
        mixed = ci.score_fills(sub[:4], [[t.middle + "\x00", t.middle] for t in sub[:4]], sandbox, ks=(1, 2))
        assert mixed["pass@1"] == 0.5 and mixed["pass@2"] == 1.0
    bad = ci.score_fills(sub, [["    return None\n"] for _ in sub], sandbox)
    assert bad["pass@1"] == 0.0 and [t["passed"] for t in bad["tasks"]] == [0] * 8


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny(TINY_BYTE)
    return cfg, params, load_tokenizer("byte")


def test_a3_fill_is_the_engines_infill_of_the_blank(model, benches):
    cfg, params, tok = model
    eng = Engine(cfg, params, tok, slots=4)
    tasks = humaneval.subset(benches["single_line"], 4)
    s = ci.FillSettings(order="left_to_right")
    fills = ci.CodeInfiller(eng, s).fill(tasks)
    inf = ci.CodeInfiller(eng, s)
    texts = []
    for t in tasks:
        pre, suf = inf.fit_context(t, len(tok.encode(t.middle)))
        assert pre == t.prompt[-len(pre):] and t.suffix.startswith(suf)
        texts.append(f"{pre}[MASK:{len(tok.encode(t.middle))}]{suf}")
    direct = eng.infill(texts, spec=DecodeSpec(order="left_to_right", group_size=1, stop_at_eos=False))
    for f, d, t, text in zip(fills, direct, tasks, texts):
        start = len(tok.encode(text.split("[MASK:")[0])) + 1  # after BOS and the left context
        blank = [int(x) for x in d.tokens[start:start + len(tok.encode(t.middle))]]
        blank = blank[:blank.index(tok.eos_id)] if tok.eos_id in blank else blank
        assert f == [tok.decode([x for x in blank if x != tok.pad_id])]
    budget = ci.CodeInfiller(eng, dataclasses.replace(s, length="budget", budget=16)).fill(tasks)
    assert len(budget) == 4 and budget != fills


def test_settings_run_end_to_end(model, benches, sandbox):
    """Every decoder setting fills and scores (a random tiny model passes nothing); prefix-only is the
    same fill for the content stream of an A3 model and for the same weights as an ar checkpoint."""
    cfg, params, tok = model
    tasks = humaneval.subset(benches["single_line"], 2)
    runs = {
        "speculative": (cfg, ci.FillSettings(order="random", speculative=4)),
        "content": (cfg, ci.FillSettings(stream="content")),
        "ar": (dataclasses.replace(cfg, objective="ar"), ci.FillSettings()),
        "mdlm": (dataclasses.replace(cfg, objective="mdlm", mask_token_id=259), ci.FillSettings(group_size=4)),
        "sampled": (cfg, ci.FillSettings(order="random", temperature=1.0, samples=2)),
    }
    out = {}
    for name, (c, s) in runs.items():
        res = ci.evaluate(Engine(c, params, tok, slots=4), tasks, s, sandbox, ks=(1, 2) if s.samples == 2 else (1,))
        assert res["pass@1"] == 0.0 and res["n_tasks"] == 2, name
        out[name] = [t["fill"] for t in res["tasks"]]
    assert out["content"] == out["ar"]
    assert out["content"] != out["speculative"]
    with pytest.raises(ValueError, match="samples=2 with temperature 0"):
        ci.FillSettings(samples=2)
    with pytest.raises(ValueError, match="FillSettings.length must be one of"):
        ci.FillSettings(length="oracle")
