"""Evaluation: task files, metrics, the `a3jax eval` CLI, and the lm-eval adapter end to end
(offline, on a local multiple-choice JSONL task)."""
import json
import math
import types

import pytest

from a3jax.cli import main
from a3jax.data.tokenizers import load_tokenizer
from a3jax.eval import tasks
from a3jax.score import log_likelihood
from test_decode_common import TINY_BYTE, tiny

MC = [
    {"context": "The cat sat on the", "choices": [" mat", " xq", " roof"], "label": 0},
    {"context": "One, two,", "choices": [" three", " zz"], "label": 0},
    {"context": "Hello", "choices": [" world", " qqqq"], "label": 1},
    {"context": "def f(x):\n    return", "choices": [" x", " (", " 1"], "label": 2},
    {"context": "abc", "choices": ["d", "e"], "label": 0},
]
OTHER = [
    {"kind": "infill", "left": "The quick brown ", "answer": "fox", "right": " jumps over the lazy dog."},
    {"left": "1 2 3 ", "answer": "4 5", "right": " 6 7"},
    {"question": "What is 2+2?", "answers": ["4", "four"]},
    {"text": "A short text to score under an ordering."},
    {"text": "Another one, a little longer than the first, with more words in it."},
]


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ev():
    cfg, params = tiny(TINY_BYTE)
    return tasks.A3Evaluator(cfg, params, load_tokenizer("byte"), batch_size=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from a3jax.checkpoint import save_params

    cfg, params = tiny(TINY_BYTE)
    return save_params(str(tmp_path_factory.mktemp("ckpt") / "tiny"), cfg, params)


def test_continuation_scores_are_exact_log_likelihoods(ev):
    """loglikelihood(context, continuation) = log_likelihood of the same row with AR groups and the
    continuation as target; groups of 2 give a different (still exact) number."""
    cfg, params = ev.cfg, ev.params
    (ll1, _), (ll2, _) = ev.loglikelihood([("Hello", " world")] * 2, group_size=1)
    assert ll1 == pytest.approx(ll2, abs=1e-5)
    ids, g, m = ev.continuation_row("Hello", " world", 1)
    assert list(g) == list(range(len(ids))) and m.sum() == 6
    ref = log_likelihood(cfg, params, ids[None], g[None], target_mask=m[None])[0]
    assert ll1 == pytest.approx(float(ref), abs=1e-4)
    ids2, g2, m2 = ev.continuation_row("Hello", " world", 2)
    assert list(g2[6:]) == [6, 6, 7, 7, 8, 8]
    (ll_g2, _), = ev.loglikelihood([("Hello", " world")], group_size=2)
    assert ll_g2 == pytest.approx(float(log_likelihood(cfg, params, ids2[None], g2[None], target_mask=m2[None])[0]),
                                  abs=1e-4)
    assert ll_g2 != pytest.approx(ll1, abs=1e-3)


def test_rolling_covers_every_token_once(ev):
    text = "x" * 300 + "y" * 300  # longer than max_position_embeddings=256: 3 windows
    rows = ev.rolling_rows(text)
    assert len(rows) == 3 and sum(int(m.sum()) for _, _, m in rows) == 600
    assert all(ids[0] == ev.tok.bos_id and not m[0] for ids, _, m in rows)
    total = ev.rolling_loglikelihood([text])[0]
    parts = sum(ll for ll, _ in ev.score_rows(rows))
    assert total == pytest.approx(parts, rel=1e-6) and total < 0


def test_metrics():
    assert tasks.exact_match("The Answer!", ["answer"]) == 1.0
    assert tasks.exact_match("an answer", ["answers"]) == 0.0
    r = tasks.rouge(["the cat sat"], ["the cat sat"])
    assert r == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert tasks.rouge(["dog"], ["the cat sat"])["rouge1"] == 0.0


def test_task_file_errors(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b"], "label": 3}])
    with pytest.raises(tasks.TaskError, match=r"bad.jsonl:1: label 3"):
        tasks.load_task(p)
    p = _write(tmp_path / "bad2.jsonl", [{"foo": 1}])
    with pytest.raises(tasks.TaskError, match="cannot tell the task kind"):
        tasks.load_task(p)
    p = _write(tmp_path / "bad3.jsonl", [{"kind": "infill", "left": "a"}])
    with pytest.raises(tasks.TaskError, match=r"lacks \['answer', 'right'\]"):
        tasks.load_task(p)
    (tmp_path / "bad4.jsonl").write_text("{not json\n")
    with pytest.raises(tasks.TaskError, match="bad4.jsonl:1: not JSON"):
        tasks.load_task(str(tmp_path / "bad4.jsonl"))
    kinds = tasks.load_task(_write(tmp_path / "ok.jsonl", MC + OTHER))
    assert {k: len(v) for k, v in kinds.items()} == {"multiple_choice": 5, "infill": 2, "qa": 1, "perplexity": 2}


@pytest.mark.slow
def test_eval_cli_all_kinds(ckpt, tmp_path, capsys):
    task = _write(tmp_path / "mixed.jsonl", MC + OTHER)
    out_json = str(tmp_path / "res.json")
    assert main(["eval", "--task", task, "--ckpt", ckpt, "--batch-size", "4", "--json", out_json,
                 "--max-new-tokens", "8", "--order", "random:4"]) == 0
    table = capsys.readouterr().out
    for word in ("multiple_choice", "acc_norm", "rouge1", "exact_match", "ppl"):
        assert word in table
    res = json.load(open(out_json))["results"]["mixed.jsonl"]
    assert res["multiple_choice"]["n"] == 5 and 0 <= res["multiple_choice"]["acc"] <= 100
    assert 0 <= res["infill"]["rougeL"] <= 100 and res["qa"]["exact_match"] in (0.0, 100.0)
    assert res["perplexity"]["ppl"] > 1 and math.isfinite(res["perplexity"]["bits_per_byte"])
    assert main(["eval", "--task", str(tmp_path / "missing.jsonl"), "--ckpt", ckpt]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.needs_torch
def test_lm_eval_adapter_end_to_end(ev, tmp_path, monkeypatch):
    """lm-eval's simple_evaluate runs our model on a local multiple-choice task, offline, and gets
    the same accuracy as our own multiple-choice runner."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from a3jax.eval.lm_eval_adapter import A3JaxLM, evaluate_local, write_mc_task
    from lm_eval.api.registry import get_model

    assert get_model("a3jax") is A3JaxLM
    lm = A3JaxLM(cfg=ev.cfg, params=ev.params, tokenizer_obj=ev.tok, batch_size=4)
    path = _write(tmp_path / "mc.jsonl", MC)
    task_dir = write_mc_task(path, str(tmp_path / "tasks"), "a3jax_local_mc")
    res = evaluate_local(lm, ["a3jax_local_mc"], task_dir)["results"]["a3jax_local_mc"]
    ours, preds = tasks.eval_multiple_choice(ev, MC)
    assert res["acc,none"] * 100 == pytest.approx(ours["acc"])
    assert res["acc_norm,none"] * 100 == pytest.approx(ours["acc_norm"])
    # the other two request types, called the way lm-eval calls them
    req = lambda *args: types.SimpleNamespace(args=args)
    (ll, greedy), = lm.loglikelihood([req("Hello", " world")])
    assert ll == pytest.approx(preds[2]["ll"][0], abs=1e-4) and isinstance(greedy, bool)
    roll = lm.loglikelihood_rolling([req("some text")])
    assert roll[0] == pytest.approx(ev.rolling_loglikelihood(["some text"])[0], abs=1e-4)
    outs = lm.generate_until([req("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 8})])
    assert len(outs) == 1 and "\n" not in outs[0] and len(outs[0].encode("utf-8", "replace")) <= 8 * 3


@pytest.mark.needs_torch
def test_lm_eval_unknown_model_args_are_an_error(ckpt):
    from a3jax.eval.lm_eval_adapter import A3JaxLM

    with pytest.raises(ValueError, match=r"unknown model_args \['stram'\]"):
        A3JaxLM.create_from_arg_string(f"ckpt={ckpt},stram=content", {"batch_size": 4, "max_batch_size": 8})
    lm = A3JaxLM.create_from_arg_string(f"ckpt={ckpt},stream=content", {"batch_size": 4, "device": "cpu"})
    assert lm.ev.stream == "content"
