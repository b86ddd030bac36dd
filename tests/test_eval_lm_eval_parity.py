"""lm-eval parity: `--model a3jax` (content stream) and lm-eval's own `hf` model on the same tiny
LLaMA and tokenizer, offline on local task files, give the same per-request log-likelihoods, the same
greedy generations and the same accuracy; and on the query stream the adapter's log-likelihoods are
exactly a3jax.score.log_likelihood of the rows built by hand."""
import dataclasses
import json

import numpy as np
import pytest

from hf_models import make_hf_llama, write_byte_tokenizer

pytestmark = pytest.mark.needs_torch  # lm-eval's hf model runs transformers

MC = [
    {"context": "The cat sat on the", "choices": [" mat", " xq", " roof"], "label": 0},
    {"context": "One, two,", "choices": [" three", " zz"], "label": 0},
    {"context": "Hello", "choices": [" world", " qqqq"], "label": 1},
    {"context": "def f(x):\n    return", "choices": [" x", " (", " 1"], "label": 2},
]
GEN = [{"prompt": "Q: 2+2?\nA:", "target": " 4"}, {"prompt": "abc", "target": "d"},
       {"prompt": "The quick brown fox", "target": " jumps"}]
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from a3jax.convert import from_hf
    from a3jax.data.tokenizers import load_tokenizer
    from a3jax.eval.lm_eval_adapter import write_generate_task, write_mc_task

    root = tmp_path_factory.mktemp("lmeval_parity")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    vocab = write_byte_tokenizer(hf_dir)
    make_hf_llama(str(hf_dir), vocab=vocab, seed=5)
    cfg, params = from_hf(str(hf_dir))
    tasks = str(root / "tasks")
    write_mc_task(_jsonl(root / "mc.jsonl", MC), tasks, "parity_mc")
    write_generate_task(_jsonl(root / "gen.jsonl", GEN), tasks, "parity_gen", max_gen_toks=8)
    return dict(hf_dir=str(hf_dir), cfg=cfg, params=params, tok=load_tokenizer(str(hf_dir)), tasks=tasks)


def _run(lm, tasks, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate  # deferred: `datasets` reads the offline variables at import
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=["parity_mc", "parity_gen"], task_manager=TaskManager(include_path=tasks),
                          bootstrap_iters=0, log_samples=True)
    order = lambda name: sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"], order("parity_mc"), order("parity_gen")


def test_a3jax_content_stream_matches_lm_eval_hf_model(setup, monkeypatch, tmp_path):
    from a3jax.eval.lm_eval_adapter import A3JaxLM
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = A3JaxLM(cfg=setup["cfg"], params=setup["params"], tokenizer_obj=setup["tok"], batch_size=4,
                   stream="content")
    hf = HFLM(pretrained=setup["hf_dir"], device="cpu", batch_size=4, dtype="float32")
    res_a, mc_a, gen_a = _run(ours, setup["tasks"], monkeypatch, tmp_path)
    res_h, mc_h, gen_h = _run(hf, setup["tasks"], monkeypatch, tmp_path)
    lls_a = np.array([r[0] for s in mc_a for r in s["filtered_resps"]], dtype=float)
    lls_h = np.array([r[0] for s in mc_h for r in s["filtered_resps"]], dtype=float)
    assert len(lls_a) == sum(len(r["choices"]) for r in MC) == len(lls_h)
    np.testing.assert_allclose(lls_a, lls_h, atol=1e-4, rtol=0)
    assert np.all(lls_a < 0) and np.ptp(lls_a) > 1.0  # real, distinct numbers, not a constant
    for key in ("acc,none", "acc_norm,none"):
        assert res_a["parity_mc"][key] == res_h["parity_mc"][key]
    gens_a = [s["filtered_resps"][0] for s in gen_a]
    gens_h = [s["filtered_resps"][0] for s in gen_h]
    assert len(gens_a) == len(GEN) and any(gens_h)  # greedy text was produced, and equals hf's
    assert gens_a == gens_h
    assert res_a["parity_gen"]["exact_match,none"] == res_h["parity_gen"]["exact_match,none"]
    # requests with different settings are decoded in separate batches and come back in request order
    # (each batch holds the longest prompt, so the decode's shape, compiled above, is reused)
    order = [(2, "\n"), (1, "@@"), (0, "\n"), (2, "@@")]
    mixed = ours.generate_until([_Req((GEN[i]["prompt"], {"until": [u], "max_gen_toks": 8})) for i, u in order])
    assert mixed[0] == gens_a[2] and mixed[2] == gens_a[0]
    assert mixed[1].startswith(gens_a[1]) and mixed[3].startswith(gens_a[2])


def test_a3jax_query_stream_equals_score_log_likelihood(setup):
    """An A3 checkpoint (the same weights with the query stream): each (context, continuation) is
    BOS + context (AR) + continuation in AR groups of 2, scored on the continuation."""
    from a3jax.eval.lm_eval_adapter import A3JaxLM
    from a3jax.score import log_likelihood

    cfg = dataclasses.replace(setup["cfg"], objective="a3")
    params, tok = setup["params"], setup["tok"]
    lm = A3JaxLM(cfg=cfg, params=params, tokenizer_obj=tok, batch_size=4, group_size=2)
    pairs = [(r["context"], c) for r in MC for c in r["choices"]]
    got = [ll for ll, _ in lm.loglikelihood([_Req(p) for p in pairs])]
    # one batch, padded at the end: pad positions come in later groups, so no target sees them
    rows = []
    for ctx, cont in pairs:
        c, x = tok.encode(ctx), tok.encode(cont)
        groups = list(range(1 + len(c))) + [1 + len(c) + i // 2 for i in range(len(x))]
        rows.append(([tok.bos_id] + c + x, groups, 1 + len(c)))
    width = max(len(ids) for ids, _, _ in rows)
    ids = np.full((len(rows), width), tok.pad_id)
    groups = np.tile(np.arange(width), (len(rows), 1)) + width
    mask = np.zeros((len(rows), width), bool)
    for i, (r, g, start) in enumerate(rows):
        ids[i, :len(r)], groups[i, :len(g)], mask[i, start:len(r)] = r, g, True
    want = np.asarray(log_likelihood(cfg, params, ids, groups, target_mask=mask))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ar = A3JaxLM(cfg=cfg, params=params, tokenizer_obj=tok, batch_size=4, group_size=1)
    got_ar = [ll for ll, _ in ar.loglikelihood([_Req(p) for p in pairs])]
    assert not np.allclose(got_ar, got, atol=1e-3)  # the grouping is really applied


class _Req:
    """What lm-eval hands a model: an object whose .args is the request tuple."""

    def __init__(self, args):
        self.args = args
