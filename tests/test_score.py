"""Exact scoring: log_likelihood against an explicit chain rule, masks, padding, errors, and the CLI."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from a3jax.cli import main
from a3jax.model import forward
from a3jax.score import ScoreError, log_likelihood, score_rows, score_texts, token_log_probs
from test_decode_common import TINY_BYTE, tiny


@given(st.lists(st.integers(0, 4), min_size=12, max_size=12))
def test_log_likelihood_is_the_chain_rule(group_list):
    """Summing the per-group conditionals, each from its own forward in which only earlier groups are
    visible (later groups' tokens replaced by garbage), gives log_likelihood."""
    cfg, params = tiny()
    rng = np.random.default_rng(sum(group_list))
    tokens = rng.integers(0, 60, (1, 12))
    groups = np.asarray(group_list)[None]
    ll = log_likelihood(cfg, params, tokens, groups)[0]
    total = 0.0
    for g in np.unique(groups):
        garbage = np.where(groups >= g, rng.integers(0, 60, tokens.shape), tokens)  # hide own/later tokens
        logits = np.asarray(forward(cfg, params, garbage, groups=groups))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for i in np.flatnonzero(groups[0] == g):
            total += logp[i, tokens[0, i]]
    assert ll == pytest.approx(total, abs=1e-4)


def test_target_mask_padding_and_batch():
    cfg, params = tiny()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60, (2, 10))
    groups = np.tile(np.arange(10), (2, 1))
    lp = np.asarray(token_log_probs(cfg, params, tokens, groups))
    seg = np.ones((2, 10), np.int32)
    seg[1, 7:] = 0
    tm = np.ones((2, 10), bool)
    tm[:, 0] = False
    ll = log_likelihood(cfg, params, tokens, groups, segment_ids=seg, target_mask=tm)
    assert ll[0] == pytest.approx(lp[0, 1:].sum(), abs=1e-4)
    assert ll[1] == pytest.approx(lp[1, 1:7].sum(), abs=1e-4)
    # [T] groups broadcast; padding content does not leak into the real tokens
    tokens2 = tokens.copy()
    tokens2[1, 7:] = 3
    ll2 = log_likelihood(cfg, params, tokens2, np.arange(10), segment_ids=seg, target_mask=tm)
    assert ll2[1] == pytest.approx(ll[1], abs=1e-5)
    with pytest.raises(ScoreError, match="target_mask has shape"):
        log_likelihood(cfg, params, tokens, groups, target_mask=tm[:, :5])
    with pytest.raises(ScoreError, match="groups has shape"):
        log_likelihood(cfg, params, tokens, groups[:, :4])
    with pytest.raises(ScoreError, match="outside"):
        log_likelihood(cfg, params, tokens + 100, groups)


def test_score_rows_is_log_likelihood_per_row():
    """The shared row scorer (score_texts and the evaluation tasks use it): each row's exact
    log-likelihood over its target, whatever rows share its batch; too long a row is refused."""
    cfg, params = tiny()
    rng = np.random.default_rng(1)
    rows = [(rng.integers(0, 60, n), rng.integers(0, 4, n), rng.random(n) < 0.7) for n in (5, 9, 12)]
    got = score_rows(cfg, params, rows, batch_size=2)
    assert len(got) == 3
    for (ids, g, m), (ll, greedy) in zip(rows, got):
        ref = log_likelihood(cfg, params, ids[None], g[None], target_mask=m[None])[0]
        assert ll == pytest.approx(float(ref), abs=1e-4) and isinstance(greedy, bool)
    n = cfg.max_position_embeddings + 1
    with pytest.raises(ScoreError, match="exceeds max_position_embeddings"):
        score_rows(cfg, params, [(np.zeros(n, int), np.zeros(n, int), np.ones(n, bool))])
    with pytest.raises(ScoreError, match="outside"):
        score_rows(cfg, params, [(np.full(4, 99), np.arange(4), np.ones(4, bool))])


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    from a3jax.checkpoint import save_params

    cfg, params = tiny(TINY_BYTE)
    return save_params(str(tmp_path_factory.mktemp("score") / "ck"), cfg, params)


def test_score_cli(byte_ckpt, capsys):
    from a3jax.data.tokenizers import load_tokenizer

    cfg, params = tiny(TINY_BYTE)
    ckpt = byte_ckpt
    assert main(["score", "--ckpt", ckpt, "--text", "hello world", "--text", "abc", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    ref = score_texts(cfg, params, load_tokenizer("byte"), ["hello world", "abc"])
    assert [r["tokens"] for r in rows] == [11, 3]
    np.testing.assert_allclose([r["log_likelihood"] for r in rows], [r["log_likelihood"] for r in ref], rtol=1e-6)
    assert main(["score", "--ckpt", ckpt, "--text", "hello world", "--grouping", "random:4"]) == 0
    assert "grouping random:4" in capsys.readouterr().out
    assert main(["score", "--ckpt", ckpt, "--text", "x", "--grouping", "nope"]) == 2
    assert "error" in capsys.readouterr().err


def test_score_cli_names_the_bad_line_of_a_jsonl_file(byte_ckpt, tmp_path, capsys):
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"text": "abc"}\n\n{"text": "x"\n')  # line 3 is cut short
    assert main(["score", "--ckpt", byte_ckpt, "--file", str(bad)]) == 2
    assert f"{bad}:3: not JSON" in capsys.readouterr().err
    bad.write_text('{"text": "abc"}\n["abc"]\n')
    assert main(["score", "--ckpt", byte_ckpt, "--file", str(bad)]) == 2
    assert f"{bad}:2: no field 'text'" in capsys.readouterr().err
    bad.write_text('\n{"text": "abc"}\n')
    assert main(["score", "--ckpt", byte_ckpt, "--file", str(bad), "--json"]) == 0
    assert [r["tokens"] for r in json.loads(capsys.readouterr().out)["results"]] == [3]


def test_score_cli_content_stream(byte_ckpt, capsys):
    """`a3jax score --stream content` is the content stream's left-to-right log-likelihood of BOS +
    the text (a3jax.score.score_rows with stream='content'), not the query stream's; it takes the
    ar grouping only."""
    cfg, params = tiny(TINY_BYTE)
    texts = ["hello world", "abc"]
    args = ["score", "--ckpt", byte_ckpt, "--text", texts[0], "--text", texts[1], "--json"]
    assert main(args + ["--stream", "content"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stream"] == "content"
    rows = []
    for t in texts:
        ids = np.array([256] + list(t.encode("utf-8")))  # the byte tokenizer: BOS 256, then the bytes
        rows.append((ids, np.arange(len(ids)), np.arange(len(ids)) > 0))
    want = [ll for ll, _ in score_rows(cfg, params, rows, batch_size=1, stream="content")]
    got = [r["log_likelihood"] for r in out["results"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert main(args) == 0
    query = [r["log_likelihood"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert not np.allclose(query, got, rtol=1e-3)  # a3 params: the two streams are different models
    assert main(args + ["--stream", "content", "--grouping", "random:4"]) == 2
    assert "left to right" in capsys.readouterr().err
