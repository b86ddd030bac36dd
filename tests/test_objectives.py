"""The objective table (a3jax.objectives): every entry answers what callers ask, a new objective is one
entry (a toy one trains, evaluates, exports and scores), and no code outside the table branches on
objective names. train.objective = ar | mdlm: MDLM masking invariants (hypothesis), the NELBO estimator against its
exact value by enumerating every unmasking order, the AR objective against HF LLaMA's causal-LM loss,
checkpoints that remember their objective, and decoders/scorers that refuse another objective's params."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from a3jax.checkpoint import load_params, save_params
from a3jax.config import ConfigError, ModelConfig, load_config
from a3jax.decode import DecodeError, DecodeSpec, generate, infill
from a3jax.decode.mdlm import reveal_counts
from a3jax.layout import Layout
from a3jax import objectives
from a3jax.model import diffusion, init_params
from a3jax.objectives import ObjectiveError
from a3jax.score import ScoreError, log_likelihood, nelbo
from a3jax.train.hooks import Hook
from a3jax.objectives.losses import loss_sums, mdlm_noise, mdlm_sums
from a3jax.train.trainer import train
from hf_models import make_hf_llama
from train_helpers import corpus, tiny_overrides  # noqa: F401 (fixture by name)

V, MASK, BOS = 32, 31, 30
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64, bos_token_id=BOS, eos_token_id=29, pad_token_id=28,
                  mask_token_id=MASK, objective="mdlm", init_std=0.3)  # wide init: peaked, varied predictions
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
T = 12
_den = jax.jit(lambda tokens, positions, segs: diffusion.denoiser_logits(CFG, PARAMS, tokens, positions, segs))
_sums = jax.jit(lambda lay, noise: mdlm_sums(CFG, PARAMS, lay, noise))
_noise = jax.jit(lambda key, lay: mdlm_noise(key, lay, MASK))


def layout(tokens, segs):
    tokens, segs = np.asarray(tokens, np.int32), np.asarray(segs, np.int32)
    pos = np.zeros_like(tokens)
    for b in range(tokens.shape[0]):  # positions restart in each segment, BOS first (as packing does)
        for s in np.unique(segs[b]):
            idx = np.flatnonzero(segs[b] == s)
            pos[b, idx] = np.arange(len(idx))
    loss = ((segs != 0) & (pos != 0)).astype(np.int32)
    tokens = np.where(pos == 0, BOS, tokens)
    return Layout(jnp.asarray(tokens), jnp.asarray(pos), jnp.zeros_like(jnp.asarray(tokens)), jnp.asarray(segs),
                  jnp.asarray(loss))


rows = st.lists(st.integers(0, 27), min_size=T, max_size=T)
segments = st.integers(2, T - 2).map(lambda cut: [1] * cut + [2] * (T - cut - 1) + [0])


# ----------------------------------------------------------------------------- the table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ObjectiveError, match=r"unknown objective 'ddpm'; the objectives are a3, ar, mdlm"):
        objectives.get("ddpm")
    with pytest.raises(ConfigError, match=r"'ddpm' is not one of \('a3', 'ar', 'mdlm'\)"):
        load_config(None, ["train.objective=ddpm"])


def test_every_entry_answers_what_callers_ask():
    got = {n: (o.stream, o.streams, o.decoder, o.exact_likelihood, o.can_infill, o.position_order,
               o.needs_mask_token) for n, o in ((n, objectives.get(n)) for n in objectives.names())}
    assert got == {"a3": ("query", ("content", "query"), "a3", True, True, False, False),
                   "ar": ("content", ("content",), "content", True, False, True, False),
                   "mdlm": ("content", ("content",), "mdlm", False, True, True, True)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        objectives.get("a3").decoder = "mdlm"
    assert objectives.of(CFG) is objectives.get("mdlm")  # a ModelConfig: the checkpoint's objective
    assert objectives.of(load_config(None, ["train.objective=ar"])) is objectives.get("ar")


def test_mdlm_flops_count_its_bidirectional_attention():
    m = ModelConfig(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                    vocab_size=128256)
    ar, md = (objectives.get(n).forward_flops(m, 2048) for n in ("ar", "mdlm"))
    # the same matmuls; every query sees all 2048 keys instead of 1024 on average: per layer one more
    # 2 (QK^T and PV) x 2 FLOPs x 1024 keys x 32 heads x 64 dims
    assert md - ar == 16 * 2 * 2 * 1024 * 32 * 64
    assert objectives.get("mdlm").train_flops(m, 2048) == 3 * md


# Branches on objective names: comparisons and membership tests of an objective (or `obj`) against
# literal names, and a literal dict indexed by the objective (dispatch). The table's attributes
# (stream, decoder, ...) are what callers compare instead.
_NAME = r"""["'](?:a3|ar|mdlm)["']"""
_OBJ = r"\b(?:\w*objective|obj)\b"
BRANCHES = [re.compile(p) for p in (
    rf"{_OBJ}\s*(?:==|!=)\s*{_NAME}", rf"{_NAME}\s*(?:==|!=)\s*[\w.]*{_OBJ}",
    rf"(?<!for ){_OBJ}\s+(?:not\s+)?in\s", rf"{_NAME}\s+(?:not\s+)?in\s+\(?[\w.]*{_OBJ}",
    rf"}}\s*\[\s*[\w.]*{_OBJ}\s*\]", r"\bobjective_of\b")]


def test_branch_patterns_catch_the_old_forms():
    caught = ['if cfg.objective == "ar":', 'flops("a3" if tcfg.objective == "a3" else "ar")', "if obj != 'a3':",
              "if cfg.objective not in tuple(allowed):", '{"a3": f, "ar": g}[obj]',
              'if "a3" in (cfg.train.objective, m):',
              "obj = objective_of(cfg, stream)"]
    fine = ["if entry.position_order:", 'rows[0][a.objective]["step_s"]',
            'if objectives.of(cfg).decoder == "mdlm":', "for obj in table:",
            "obj = objectives.get(name)", "if self.model.objective != obj:"]
    assert all(any(p.search(line) for p in BRANCHES) for line in caught)
    assert not [line for line in fine if any(p.search(line) for p in BRANCHES)]


def test_no_code_outside_the_table_branches_on_objective_names():
    hits = []
    for top in ("a3jax", "bench"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(dirpath, f)
                if not f.endswith(".py") or path == objectives.__file__:
                    continue
                for n, line in enumerate(open(path, encoding="utf-8"), 1):
                    code = line.split("#")[0]
                    if any(p.search(code) for p in BRANCHES):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not hits, "ask a3jax.objectives instead:\n" + "\n".join(hits)


def test_a_new_objective_is_one_entry(tmp_path, corpus, capsys):  # noqa: F811
    # A toy objective: the query-stream loss on rows in position order (groups = positions, so every
    # token sees the ones before it). Registering it is all it takes to train, evaluate, export, score.
    def toy_sums(cfg_model, params, layout, noise, z_loss):
        return loss_sums(cfg_model, params, layout._replace(groups=layout.positions), z_loss, "query")

    objectives.register(objectives.Objective(
        name="toy", stream="query", streams=("content", "query"), decoder="a3", scorer="query", can_infill=True,
        position_order=True, needs_mask_token=False, predicts_next=False, sums=toy_sums,
        forward_flops=objectives.get("a3").forward_flops, eval_label="toy"))
    try:
        with pytest.raises(ObjectiveError, match="already registered"):
            objectives.register(objectives.get("toy"))
        run, seen = tmp_path / "run", []
        cfg = load_config(None, tiny_overrides(str(run), corpus, **{
            "train.objective": "toy", "data.stages": "[{ar: 2}, {ar: 4}]", "train.steps": 3, "train.log_every": 1,
            "train.eval_every": 3, "checkpoint.every": 0}))
        res = train(cfg, progress_bar=False, tensorboard=False, hooks=[Hook(lambda i: seen.append(i.step), every=2)])
        assert cfg.model.objective == "toy" and res["step"] == 3 and np.isfinite(res["loss"])
        assert set(res["eval"]) == {"toy"} and np.isfinite(res["eval"]["toy"])
        assert seen == [2, 3]  # the caller's hook: every 2 steps and at the end
        assert "stage 1 (ar) runs 1 of its 4 steps" in capsys.readouterr().out  # train.steps cut the curriculum
        mcfg, params = load_params(str(run / "final"))
        assert mcfg.objective == "toy"
        ids = np.array([[256, 97, 98, 99, 100]])
        assert np.isfinite(log_likelihood(mcfg, params, ids, np.arange(5))).all()
    finally:
        objectives.unregister("toy")
    with pytest.raises(ConfigError, match="'toy' is not one of"):
        load_config(None, ["train.objective=toy"])


# ----------------------------------------------------------------------------- masking invariants


@settings(max_examples=15, deadline=None)
@given(a=rows, b=rows, seg=segments, seed=st.integers(0, 2 ** 16))
def test_masked_logits_ignore_true_tokens_and_unmasked_carry_no_loss(a, b, seg, seed):
    lay = layout([a], [seg])
    noise = _noise(jax.random.PRNGKey(seed), lay)
    masked = np.asarray(noise["weight"][0] > 0)
    # another row that differs from the first exactly at the masked positions
    other = np.where(masked, (np.asarray(b) + 1 + np.asarray(lay.tokens[0])) % 28, np.asarray(lay.tokens[0]))
    lay2 = lay._replace(tokens=jnp.asarray(other[None], jnp.int32))
    noise2 = _noise(jax.random.PRNGKey(seed), lay2)
    np.testing.assert_array_equal(np.asarray(noise["weight"]), np.asarray(noise2["weight"]))
    l1 = _den(noise["tokens"], lay.positions, lay.segment_ids)
    l2 = _den(noise2["tokens"], lay.positions, lay.segment_ids)
    np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))  # every position, masked or not
    assert np.all(np.isneginf(np.asarray(l1)[..., MASK]))  # SUBS: MASK never predicted
    # only targets are masked (never BOS or padding) and masked slots hold MASK
    assert not (masked & (np.asarray(lay.loss_mask[0]) == 0)).any()
    np.testing.assert_array_equal(np.asarray(noise["tokens"][0])[masked], MASK)
    # the loss is the sum over masked positions of CE / t: changing the labels at unmasked positions
    # (keeping their inputs) changes nothing
    s1 = _sums(lay, noise)
    relabel = lay._replace(tokens=jnp.where(jnp.asarray(masked)[None], lay.tokens, (lay.tokens + 3) % 28))
    s2 = _sums(relabel, {"tokens": noise["tokens"], "weight": noise["weight"]})
    np.testing.assert_allclose(float(s1["nll"]), float(s2["nll"]), rtol=1e-6)
    lp = np.asarray(jax.nn.log_softmax(l1, -1))[0]
    want = sum(-lp[i, int(lay.tokens[0, i])] * float(noise["weight"][0, i]) for i in np.flatnonzero(masked))
    np.testing.assert_allclose(float(s1["nll"]), want, rtol=1e-5, atol=1e-5)
    assert float(s1["tokens"]) == float(np.asarray(lay.loss_mask).sum())


@settings(max_examples=10, deadline=None)
@given(a=rows, b=rows, seg=segments)
def test_denoiser_is_bidirectional_inside_a_document_and_blind_across(a, b, seg):
    lay = layout([a], [seg])
    seg_ = np.asarray(seg)
    first = seg_ == 1
    # changing the second document changes nothing in the first; changing a late token of the first
    # changes its early positions (attention is bidirectional, not causal)
    other = np.where(seg_ == 2, (np.asarray(b) + 1 + np.asarray(lay.tokens[0])) % 28, np.asarray(lay.tokens[0]))
    la = _den(lay.tokens, lay.positions, lay.segment_ids)
    lb = _den(jnp.asarray(other[None], jnp.int32), lay.positions, lay.segment_ids)
    la, lb = np.asarray(la)[..., :MASK], np.asarray(lb)[..., :MASK]  # MASK's logit is -inf everywhere
    np.testing.assert_allclose(la[0, first], lb[0, first], rtol=1e-5, atol=1e-5)
    last = int(np.flatnonzero(first)[-1])
    late = np.asarray(lay.tokens[0]).copy()
    late[last] = (late[last] + 5) % 28
    lc = _den(jnp.asarray(late[None], jnp.int32), lay.positions, lay.segment_ids)
    assert np.abs(np.asarray(lc)[0, 0, :MASK] - la[0, 0]).max() > 1e-4


def test_fully_masked_and_unmasked_rows_and_low_discrepancy_times():
    lay = layout(np.tile(np.arange(T) % 28, (2, 1)), [[1] * T, [1] * T])
    target = np.asarray(lay.loss_mask) > 0
    xt, masked = diffusion.corrupt(jax.random.PRNGKey(0), lay.tokens, jnp.asarray(target), jnp.array([1.0, 0.0]), MASK)
    xt, masked = np.asarray(xt), np.asarray(masked)
    np.testing.assert_array_equal(masked[0], target[0])  # t = 1: every target masked, BOS kept
    assert xt[0, 0] == BOS and (xt[0, 1:] == MASK).all()
    assert not masked[1].any() and (xt[1] == np.asarray(lay.tokens[1])).all()  # t = 0: nothing masked
    w = jnp.asarray(masked, jnp.float32) / jnp.array([1.0, 1.0])[:, None]
    s = _sums(lay, {"tokens": jnp.asarray(xt), "weight": w})
    nothing = _sums(lay, {"tokens": lay.tokens, "weight": jnp.zeros((2, T))})
    assert float(nothing["nll"]) == 0.0 and float(nothing["tokens"]) == 2 * (T - 1)  # still counted per token
    assert float(s["nll"]) > 0
    t = np.sort(np.asarray(diffusion.sample_times(jax.random.PRNGKey(3), 16)))
    assert t.min() >= diffusion.T_MIN and t.max() <= 1.0
    np.testing.assert_allclose(np.diff(t), (1 - diffusion.T_MIN) / 16, rtol=1e-4)  # one per 1/B stratum


# ----------------------------------------------------------------------------- NELBO


def exact_nelbo(tokens, n_ctx):
    """E over uniformly random unmasking orders of sum_k -log p(x_{o_k} | x with o_k.. masked): the
    denoiser is run on every masked subset once, then all L! orders are averaged."""
    L = len(tokens) - n_ctx
    subsets = list(itertools.product([0, 1], repeat=L))
    rows = np.array([np.concatenate([tokens[:n_ctx], np.where(np.array(m, bool), MASK, tokens[n_ctx:])])
                     for m in subsets])
    logp = np.asarray(jax.nn.log_softmax(diffusion.denoiser_logits(
        CFG, PARAMS, jnp.asarray(rows, jnp.int32), jnp.broadcast_to(jnp.arange(len(tokens)), rows.shape),
        jnp.ones(rows.shape, jnp.int32)), -1))
    index = {m: k for k, m in enumerate(subsets)}
    total = 0.0
    orders = list(itertools.permutations(range(L)))
    for order in orders:
        masked = [1] * L
        for i in order:  # reveal i: its prediction is made with every not-yet-revealed target masked
            total -= logp[index[tuple(masked)], n_ctx + i, tokens[n_ctx + i]]
            masked[i] = 0
    return total / len(orders)


@pytest.mark.slow
def test_nelbo_matches_exact_enumeration_of_orders():
    tokens = np.array([[BOS, 3, 17, 5, 9, 22, 11], [BOS, 7, 7, 7, 1, 2, 3]])
    target = np.zeros(tokens.shape, bool)
    target[:, 1:] = True  # 6 targets after BOS
    est, se = nelbo(CFG, PARAMS, tokens, target_mask=target, samples=3000, seed=1)
    for r in range(2):
        exact = exact_nelbo(tokens[r], 1)
        assert se[r] < 0.03 * exact  # the estimate is precise enough for the check to have power
        assert abs(est[r] - exact) < 3 * se[r], (r, est[r], exact, se[r])
    # the NELBO bounds -log P from above, so it is at least the entropy floor of nothing: positive, finite
    assert np.all(np.isfinite(est)) and np.all(est > 0)


# ----------------------------------------------------------------------------- AR == HF LLaMA


@pytest.mark.needs_torch
def test_ar_objective_equals_hf_causal_lm_loss(tmp_path):
    import torch  # deferred: optional

    from a3jax.convert.hf import from_hf

    hf = make_hf_llama(str(tmp_path / "hf"))
    cfg, params = from_hf(str(tmp_path / "hf"))
    cfg = dataclasses.replace(cfg, objective="ar")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 96, (3, 20))
    tokens[:, 0] = 1
    with torch.no_grad():
        want = float(hf(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss)  # mean over 3 x 19
    t = jnp.asarray(tokens, jnp.int32)
    ar = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), t.shape)
    # the groups the rows carry do not matter: ar uses groups = positions
    lay = Layout(t, ar, jnp.zeros_like(t), jnp.ones_like(t), (ar > 0).astype(jnp.int32))
    s = objectives.get("ar").sums(cfg, params, lay, None, 0.0)
    assert float(s["tokens"]) == 3 * 19
    np.testing.assert_allclose(float(s["nll"] / s["tokens"]), want, rtol=2e-5)
    # and the scorer of an ar model gives the same chain rule
    ll = log_likelihood(cfg, params, tokens, np.arange(20), target_mask=np.broadcast_to(np.arange(20) > 0, (3, 20)))
    np.testing.assert_allclose(-ll.sum() / 57, want, rtol=2e-5)


# ----------------------------------------------------------------------------- checkpoints and refusals


@pytest.mark.slow
def test_checkpoint_records_objective_and_decoders_refuse_a_mismatch(tmp_path, corpus, capsys):  # noqa: F811
    run = tmp_path / "run"
    ov = tiny_overrides(str(run), corpus, **{"train.objective": "mdlm", "model.mask_token_id": 259,
                                               "data.stages": "[{ar: 3}]", "train.eval_every": 3, "train.microbatches": 2,
                                               "checkpoint.every": 3})
    res = train(load_config(None, ov), progress_bar=False, tensorboard=False)
    assert set(res["eval"]) == {"nelbo"} and np.isfinite(res["eval"]["nelbo"])
    saved = json.load(open(next((run / "checkpoints" / "3" / "config").glob("*"))))
    assert saved["train"]["objective"] == "mdlm" and saved["model"]["objective"] == "mdlm"
    # resuming the run under another objective is refused, naming the key
    with pytest.raises(ConfigError, match="train.objective: checkpoint 'mdlm' vs config 'a3'"):
        train(load_config(None, tiny_overrides(str(run), corpus, **{"data.stages": "[{ar: 6}]"})),
              progress_bar=False, tensorboard=False)
    # a params checkpoint keeps it in model.yaml
    from a3jax.demo import final_params
    cfg = load_config(None, ov)
    save_params(str(tmp_path / "final"), cfg.model, final_params(cfg))
    mcfg, params = load_params(str(tmp_path / "final"))
    assert mcfg.objective == "mdlm"
    ids = np.array([[256, 97, 98, 99, 100, 101, 102, 103]])
    known = np.array([[1, 1, 0, 0, 0, 1, 1, 1]], bool)
    with pytest.raises(ScoreError, match="train.objective='mdlm'.*nelbo"):
        log_likelihood(mcfg, params, ids, np.arange(8))
    out = infill(mcfg, params, ids, known, DecodeSpec(order="random", steps=2))  # MDLM sampler
    assert out.num_steps == 2 and (out.step[0, 2:5] >= 0).all() and (out.tokens[known] == ids[known]).all()
    with pytest.raises(DecodeError, match="threshold"):
        infill(mcfg, params, ids, known, DecodeSpec(order="confidence", threshold=0.5))
    a3 = dataclasses.replace(mcfg, objective="a3")
    with pytest.raises(ObjectiveError, match="'a3'.*needs 'mdlm'"):
        nelbo(a3, params, ids)
    ar = dataclasses.replace(mcfg, objective="ar")
    with pytest.raises(ObjectiveError, match="not been A3-adapted.*model.init_from=CKPT"):
        infill(ar, params, ids, known)
    with pytest.raises(DecodeError, match="left to right"):
        generate(ar, params, [[256, 97]], 4, DecodeSpec(order="confidence"))
    with pytest.raises(ScoreError, match="left to right"):
        log_likelihood(ar, params, ids, np.array([0, 2, 1, 3, 4, 5, 6, 7]))
    # the evaluation tasks (and the lm-eval adapter, which wraps A3Evaluator) take both objectives
    from a3jax.data import load_tokenizer
    from a3jax.eval.tasks import A3Evaluator, TaskError
    tok = load_tokenizer("byte")
    ev = A3Evaluator(mcfg, params, tok, batch_size=2)
    (ll, greedy), = ev.loglikelihood([("abc", "def")])
    assert np.isfinite(ll) and ll < 0 and isinstance(greedy, bool)  # -NELBO
    assert len(ev.generate(["abc"], max_new_tokens=4, order="confidence", until=())[0]) > 0
    assert len(ev.infill_texts([("ab", "ef", 2)], order="random")) == 1
    ev_ar = A3Evaluator(ar, params, tok, batch_size=2)
    (ll_ar, _), = ev_ar.loglikelihood([("abc", "def")])
    assert np.isfinite(ll_ar) and ll_ar < 0
    with pytest.raises(TaskError, match="left to right"):
        ev_ar.loglikelihood([("abc", "def")], group_size=2)
    # the CLI says it, too
    from a3jax.decode.cli import infill_main
    save_params(str(tmp_path / "ar"), ar, params)
    assert infill_main(["--ckpt", str(tmp_path / "ar"), "--text", "ab[MASK:2]cd"]) == 2
    assert "has not been A3-adapted" in capsys.readouterr().err


def test_mdlm_schedule_reveals_every_blank_in_s_steps():
    n = jnp.array([0, 1, 5, 7, 64])
    for steps in (1, 3, 8):
        counts = np.stack([np.asarray(reveal_counts(n, steps, s)) for s in range(steps)])
        np.testing.assert_array_equal(counts[-1], np.asarray(n))  # all revealed at the last step
        assert (np.diff(counts, axis=0) >= 0).all()
    ids = np.tile(np.array([BOS] + list(range(1, 16))), (2, 1))
    known = np.zeros(ids.shape, bool)
    known[:, :4] = True
    valid = np.ones(ids.shape, bool)
    valid[1, 12:] = False  # row 1 is shorter: padding is neither context nor filled
    for order in ("random", "confidence", "left_to_right"):
        r = infill(CFG, PARAMS, ids, known, DecodeSpec(order=order, steps=3), valid=valid)
        assert r.num_steps == 3
        assert (r.step[0, 4:] >= 0).all() and (r.step[1, 4:12] >= 0).all() and (r.step[1, 12:] == -1).all()
        assert (r.tokens[known] == ids[known]).all() and not (r.tokens[valid] == MASK).any()
        if order == "left_to_right":
            assert (np.diff(r.step[0, 4:]) >= 0).all()
