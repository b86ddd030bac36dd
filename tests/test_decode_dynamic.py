"""Dynamic-order decoding: EOS that ends a row only when every blank before it is filled, mode='reference', scores
from the sampling distribution, semi-autoregressive windows, phases whose query rows follow the
remaining blanks, per-row seeds and num_samples (chi-square against an enumerated distribution).

Brute-force references are plain numpy loops over the model's full forward (a3jax.model.forward),
written from the reference code's algorithm (generate_dynamic_resampling), not from a3jax.decode."""
import itertools

import numpy as np
import pytest
from scipy import stats

from a3jax.config import ModelConfig
from a3jax.decode import DecodeError, DecodeSpec, SamplingParams, generate, infill
from a3jax.decode import orders
from a3jax.model import forward, numpy_init
from a3jax.score import log_likelihood
from test_decode_common import batch, tiny

import jax.numpy as jnp

# 20 blanks in rows of 24: the dynamic decoder runs two phases (32 and 16 query rows)
ROWS = dict(b=2, t=24, n_blank=20)
DYNAMIC = ("confidence", "entropy", "margin", "random_dynamic")


def _rows(seed=3):
    return batch(seed=seed, **ROWS)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- EOS


def test_eos_finished_on_hand_built_rows():
    E = 9
    blank = np.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    tokens = np.array([[E, 5, E, 3, 3],   # known EOS at 0 does not count; EOS at 2, hole at 1
                       [5, 4, E, 3, 3],   # EOS at 2, everything before filled -> finished
                       [5, E, 2, E, 3],   # first EOS at 1 finished, though a later EOS has a hole
                       [5, 4, 4, 4, E],   # EOS committed at 4 with a hole at 3
                       [E, 1, 1, 1, 1]])  # EOS at the very first blank: finished
    filled = np.array([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 1, 0, 1], [1, 0, 0, 0, 0]], bool)
    got = np.asarray(orders.eos_finished(jnp.asarray(tokens), jnp.asarray(filled), jnp.asarray(blank), E))
    assert list(got) == [False, True, True, False, True]
    # an EOS that is not committed (a blank's placeholder value) never ends a row
    assert not np.asarray(orders.eos_finished(jnp.asarray(tokens), jnp.asarray(blank & False), jnp.asarray(blank),
                                              E)).any()


def _reference_dynamic(cfg, params, tokens, known, valid, eos, temperature=0.0, top_k=0, forced=None):
    """generate_dynamic_resampling, greedy, confidence, one blank per step, as a numpy loop: committed
    tokens in group 0, blanks in group 1, full forward each step; a row ends once its first committed
    EOS has every blank before it filled. Scores come from the distribution tokens are drawn from
    (logits / temperature, top-k filtered). forced: commit these tokens instead (teacher forcing).
    Returns (tokens, commit step per position)."""
    cur, filled = tokens.copy(), known | ~valid
    step = np.full(tokens.shape, -1)
    done = np.zeros(len(tokens), bool)
    for s in range(int((~filled).sum())):
        if done.all() or filled.all():
            break
        logits = np.asarray(forward(cfg, params, cur, groups=np.where(filled, 0, 1),
                                    segment_ids=valid.astype(np.int32)), np.float64)
        scaled = logits / temperature if temperature > 0 else logits
        if top_k:
            kth = -np.sort(-scaled, axis=-1)[..., top_k - 1:top_k]
            scaled = np.where(scaled >= kth, scaled, -np.inf)
        conf = _softmax(scaled).max(-1)
        for r in range(len(cur)):
            if done[r] or filled[r].all():
                continue
            pos = int(np.argmax(np.where(filled[r], -1.0, conf[r])))
            cur[r, pos] = forced[r, pos] if forced is not None else int(np.argmax(logits[r, pos]))
            filled[r, pos], step[r, pos] = True, s
            hits = np.flatnonzero(~known[r] & filled[r] & (cur[r] == eos))
            if eos >= 0 and len(hits) and filled[r, :hits[0]].all():
                done[r] = True
    return cur, step


PROMPTS = [[60, 1, 2], [60, 5]]


def test_generate_eos_matches_the_brute_force_reference_loop():
    """Dynamic decoding with an EOS committed while blanks before it are still open: the row goes on
    until they are filled (ending it there would leave holes), as the reference does."""
    cfg, params = tiny()
    n = 10
    info = generate(cfg, params, PROMPTS, n, DecodeSpec(order="confidence", stop_at_eos=False, mode="reference"))
    free = info.new
    # the EOS: row 0's token committed at step 1, at a position with an open blank before it
    lens = np.array([len(p) for p in PROMPTS])
    step0 = info.step[0, lens[0]:lens[0] + n]
    j = int(np.flatnonzero(step0 == 1)[0])
    assert (step0[:j] > 1).any(), "the chosen EOS must have a hole before it when it is committed"
    eos = int(free[0, j])
    res = generate(cfg, params, PROMPTS, n, DecodeSpec(order="confidence", eos_id=eos, mode="reference"))
    out = res.new
    t = int(lens.max()) + n
    tokens = np.full((2, t), cfg.pad_token_id)
    known = np.zeros((2, t), bool)
    for r, p in enumerate(PROMPTS):
        tokens[r, :len(p)], known[r, :len(p)] = p, True
    valid = np.arange(t)[None] < (lens + n)[:, None]
    ref, _ = _reference_dynamic(cfg, params, tokens, known, valid, eos)
    for r in range(2):
        want = ref[r, lens[r]:lens[r] + n].copy()
        hits = np.flatnonzero(want == eos)
        if len(hits):
            want[hits[0] + 1:] = cfg.pad_token_id
            assert res.eos_at[r] == lens[r] + hits[0]
        else:
            assert res.eos_at[r] == -1
        np.testing.assert_array_equal(out[r], want)
    assert (out[0, :j] != cfg.pad_token_id).all()  # no holes before the EOS
    assert res.step[0].max() > 1  # ending at the EOS would stop row 0 at step 1


@pytest.mark.slow
@pytest.mark.parametrize("kw,seed", [(dict(order="confidence", group_size=2), 0), (dict(order="random", group_size=2), 4),
                                     (dict(order="random", speculative=2), 4)])
def test_eos_rule_for_fixed_dynamic_and_speculative(kw, seed):
    """A3 decoding with EOS = the free run cut at the first step where the row's first committed EOS
    has every blank before it filled; blanks after it are padding with step -1."""
    cfg, params = tiny()
    n = 10
    lens = np.array([len(p) for p in PROMPTS])
    fi = generate(cfg, params, PROMPTS, n, DecodeSpec(stop_at_eos=False, **kw), SamplingParams(seed=seed))
    free = fi.new
    # the EOS: row 0's earliest commit that has an open blank before it when it is committed
    s0 = fi.step[0, lens[0]:lens[0] + n]
    cands = [j for j in range(n) if (s0[:j] > s0[j]).any()]
    assert cands
    eos = int(free[0, min(cands, key=lambda j: s0[j])])
    res = generate(cfg, params, PROMPTS, n, DecodeSpec(eos_id=eos, **kw), SamplingParams(seed=seed))
    out = res.new
    for r in range(2):
        new = free[r]
        steps = fi.step[r, lens[r]:lens[r] + n]
        end = None
        for s in range(int(steps.max()) + 1):  # first step after which the rule holds
            done = steps <= s
            hits = np.flatnonzero(done & (new == eos))
            if len(hits) and done[:hits[0]].all():
                end = s
                break
        if end is None:
            want = new
        else:
            want = np.where(steps <= end, new, cfg.pad_token_id)
            first = np.flatnonzero((steps <= end) & (new == eos))[0]
            want[first + 1:] = cfg.pad_token_id
            assert res.eos_at[r] == lens[r] + first
            assert (res.step[r, lens[r] + first + 1:] == -1).all()
            assert (want[:first] != cfg.pad_token_id).all()
        np.testing.assert_array_equal(out[r], want)
    assert res.eos_at[0] >= 0


# ----------------------------------------------------------------------------- phases and windows


@pytest.mark.slow
def test_every_order_window_and_phase_split_cached_equals_uncached():
    """Identical greedy tokens and steps: cached, uncached and one phase (every blank's query row at
    every step) against the default phases, for every dynamic criterion; a window; threshold commits
    (their pending rows enter the cache between phases). Fixed orders: tests/test_decode.py."""
    cfg, params = tiny()
    tokens, known = _rows()
    assert orders.phase_widths(20, 32, 8, 2) == (32, 16)  # the split really happens
    for name in DYNAMIC:
        kw = dict(order=name, group_size=2)
        a = infill(cfg, params, tokens, known, DecodeSpec(**kw))
        for other in (dict(use_cache=False), dict(phases=1)):
            b = infill(cfg, params, tokens, known, DecodeSpec(**kw, **other))
            np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=f"{name} {other}")
            np.testing.assert_array_equal(a.step, b.step, err_msg=f"{name} {other}")
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    for kw in (dict(order="confidence", group_size=2, window=8), dict(order="margin", threshold=0.3)):
        a = infill(cfg, params, tokens, known, DecodeSpec(**kw))
        b = infill(cfg, params, tokens, known, DecodeSpec(use_cache=False, **kw))
        np.testing.assert_array_equal(a.tokens, b.tokens, err_msg=str(kw))
        np.testing.assert_array_equal(a.step, b.step, err_msg=str(kw))
        assert (a.step[~known] >= 0).all()


@pytest.mark.parametrize("kw", [dict(order="confidence", group_size=2, window=8),
                                dict(order="entropy", threshold=0.3, window=6)])
def test_window_never_commits_outside_its_range(kw):
    """Every commit of step s is among the first W blanks still open before step s, and the window
    changes the order (the same decode without it commits elsewhere)."""
    cfg, params = tiny()
    tokens, known = _rows()
    w = kw["window"]
    res = infill(cfg, params, tokens, known, DecodeSpec(**kw))
    blank = ~known
    for r in range(len(tokens)):
        assert (res.step[r][blank[r]] >= 0).all()
        for s in range(res.num_steps):
            open_before = np.flatnonzero(blank[r] & ((res.step[r] >= s) | (res.step[r] < 0)))
            now = np.flatnonzero(res.step[r] == s)
            assert set(now) <= set(open_before[:w]), (r, s, now, open_before[:w])
    free = infill(cfg, params, tokens, known, DecodeSpec(**{k: v for k, v in kw.items() if k != "window"}))
    assert (free.step != res.step).any()


def test_dynamic_scores_come_from_the_sampling_distribution():
    """Commit order under temperature 0.5 and top-k 2 (teacher forcing fixes the tokens, so the order
    is deterministic) equals the reference loop that scores the tempered, filtered distribution,
    and differs from scoring the raw model distribution."""
    cfg, params = tiny()
    tokens, known = _rows(seed=21)
    valid = np.ones_like(known)
    res = infill(cfg, params, tokens, known,
                 DecodeSpec(order="confidence", group_size=1, mode="reference", teacher_forcing=True),
                 SamplingParams(temperature=0.5, top_k=2))
    _, want = _reference_dynamic(cfg, params, tokens, known, valid, -1, temperature=0.5, top_k=2, forced=tokens)
    _, raw = _reference_dynamic(cfg, params, tokens, known, valid, -1, forced=tokens)
    np.testing.assert_array_equal(res.step, want)
    assert (want != raw).any()


def test_a3_mode_with_a_grouping_is_generate_two_stream():
    """The reference's generate_two_stream as a numpy loop: the given tokens are group 0, the other
    groups are decoded in ascending order, each by a full forward with every position's group id;
    greedy. mode='a3' with that grouping as the order gives the same tokens (cached)."""
    cfg, params = tiny()
    tokens, known = _rows(seed=21)
    rng = np.random.default_rng(2)
    group_ids = np.where(known, 0, rng.integers(1, 8, known.shape))
    cur = tokens.copy()
    for g in np.unique(group_ids[group_ids > 0]):
        logits = np.asarray(forward(cfg, params, cur, groups=group_ids))
        cur = np.where(group_ids == g, logits.argmax(-1), cur)
    out = infill(cfg, params, tokens, known, DecodeSpec(order=group_ids, mode="a3")).tokens
    np.testing.assert_array_equal(out, cur)


# ----------------------------------------------------------------------------- modes and errors


def test_mode_and_option_errors():
    cfg, params = tiny()
    tokens, known = _rows()
    for order in ("left_to_right", "random", np.arange(24)):
        with pytest.raises(DecodeError, match="mode='a3'.*generate_two_stream"):
            infill(cfg, params, tokens, known, DecodeSpec(order=order, mode="reference")).tokens
    with pytest.raises(DecodeError, match="mode must be one of"):
        infill(cfg, params, tokens, known, DecodeSpec(mode="diffusion"))
    with pytest.raises(DecodeError, match="window=4 applies to the dynamic orders"):
        infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", window=4))
    with pytest.raises(DecodeError, match="group_size=4 commits more blanks per step than window=2"):
        infill(cfg, params, tokens, known, DecodeSpec(order="confidence", group_size=4, window=2))
    with pytest.raises(DecodeError, match="window must be a positive int"):
        infill(cfg, params, tokens, known, DecodeSpec(order="confidence", window=0))
    with pytest.raises(DecodeError, match="phases must be a positive int"):
        infill(cfg, params, tokens, known, DecodeSpec(order="confidence", phases=0))
    with pytest.raises(DecodeError, match="seed has 3 entries but the batch has 2 rows"):
        infill(cfg, params, tokens, known, None, SamplingParams(seed=np.array([1, 2, 3])))
    with pytest.raises(DecodeError, match="seed must be an int"):
        infill(cfg, params, tokens, known, None, SamplingParams(seed=1.5))
    with pytest.raises(DecodeError, match="already independent"):
        infill(cfg, params, tokens, known, None, SamplingParams(seed=np.array([1, 2]), independent_rows=True))
    with pytest.raises(DecodeError, match="num_samples must be a positive int"):
        infill(cfg, params, tokens, known, None, SamplingParams(num_samples=0))
    with pytest.raises(DecodeError, match="SamplingParams.num_samples=2 does not apply"):
        generate(cfg, params, PROMPTS, 4, DecodeSpec(stream="content"), SamplingParams(num_samples=2))


# ----------------------------------------------------------------------------- seeds and samples


@pytest.mark.slow
def test_row_with_seed_s_equals_the_row_alone_with_seed_s():
    cfg, params = tiny()
    tokens, known = _rows()
    spec = DecodeSpec(order="confidence", group_size=2)
    both = infill(cfg, params, tokens, known, spec, SamplingParams(1.0, top_p=0.9, seed=np.array([7, 11]))).tokens
    for r, s in enumerate((7, 11)):
        alone = infill(cfg, params, tokens[r:r + 1], known[r:r + 1], spec, SamplingParams(1.0, top_p=0.9, seed=s)).tokens
        np.testing.assert_array_equal(both[r], alone[0])
    same = infill(cfg, params, tokens[[0, 0]], known[[0, 0]], spec, SamplingParams(1.0, top_p=0.9, seed=np.array([7, 7]))).tokens
    np.testing.assert_array_equal(same[0], same[1])
    assert (same[1] != both[1]).any()


V = 4
CFG4 = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=8, bos_token_id=0, eos_token_id=-1, pad_token_id=-1, init_std=0.5)
SAMPLES = 4000


@pytest.mark.slow
def test_num_samples_are_independent_draws_of_the_model():
    """num_samples=4000 of one prompt in one batch, token by token left to right: the histogram of the
    3-blank completions matches their exact probabilities (all 64 scored), and pairs of neighbouring
    samples are independent (their first tokens follow the product distribution)."""
    params = numpy_init(CFG4, 1)
    base = np.array([0, 0, 0, 0])
    known = np.array([True, False, False, False])
    ltr = DecodeSpec(order="left_to_right", group_size=1)
    out = infill(CFG4, params, base, known, ltr, SamplingParams(temperature=1.0, seed=3, num_samples=SAMPLES)).tokens
    assert out.shape == (SAMPLES, 4)
    comps = np.array([[0, *c] for c in itertools.product(range(V), repeat=3)])
    groups = np.array([0, 1, 2, 3])
    exact = np.exp(log_likelihood(CFG4, params, comps, groups, target_mask=np.broadcast_to(~known, comps.shape))
                   .astype(np.float64))
    assert abs(exact.sum() - 1) < 1e-4
    idx = out[:, 1] * 16 + out[:, 2] * 4 + out[:, 3]
    counts = np.bincount(idx, minlength=64)
    assert stats.chisquare(counts, exact / exact.sum() * SAMPLES).pvalue > 1e-3
    first = exact.reshape(V, 16).sum(1)
    pairs = np.bincount(out[0::2, 1] * V + out[1::2, 1], minlength=V * V)
    assert stats.chisquare(pairs, np.outer(first, first).reshape(-1) / first.sum() ** 2 * (SAMPLES // 2)).pvalue > 1e-3
    # batching is invisible: samples 0..3 of a 4-sample call are the first 4 of the big one
    few = infill(CFG4, params, base, known, ltr, SamplingParams(temperature=1.0, seed=3, num_samples=4)).tokens
    np.testing.assert_array_equal(few, out[:4])
