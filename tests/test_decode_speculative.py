"""Self-speculative sampling (a3jax.decode.speculative) is exactly the token-by-token distribution.

Exactness by enumeration: a tiny random model over a 4-token vocab fills 5 blanks, so all 4^5 = 1024
completions can be scored. Their exact probabilities under the token-by-token factorisation of the
order come from a3jax.score (log_likelihood; its per-position terms for the filtered case), and
20,000 speculative samples (rows of one batch with independent keys) must match them by a
chi-square test. The same test rejects plain group-wise decoding (tokens of one group drawn
independently), so it can see the difference. Greedy speculative = greedy token-by-token; cached =
uncached."""
import itertools

import numpy as np
import pytest
from scipy import stats

from a3jax.config import ModelConfig
from a3jax.decode import DecodeError, DecodeSpec, SamplingParams, generate, infill
from a3jax.model import numpy_init
from a3jax.score import log_likelihood, token_log_probs
from test_decode_common import batch, tiny

V, T = 4, 7
KNOWN = np.zeros(T, bool)
KNOWN[[0, 3]] = True  # a context token at 0 and one inside: infilling, not only continuation
BLANKS = np.flatnonzero(~KNOWN)
BASE = np.array([0, 0, 0, 1, 0, 0, 0])
# init_std 0.5 (25x the default): the random model's neighbouring tokens depend strongly on each
# other (group-wise and token-by-token distributions are far apart), with ~4.6 nats of entropy left.
CFG = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=-1, pad_token_id=-1, init_std=0.5)
SAMPLES = 20_000
USER = np.array([0, 4, 2, 0, 5, 1, 3])  # a user-given token order of the blanks (values at known ignored)


def _params():
    return numpy_init(CFG, 0)


def _order_positions(order):
    """Positions of the blanks in token order."""
    if isinstance(order, str):
        assert order == "left_to_right"
        return BLANKS
    return BLANKS[np.argsort(order[BLANKS], kind="stable")]


def _completions(pos):
    """Every completion [V^N, T]; digit j of row r (base V, most significant first) is the token at pos[j]."""
    digits = np.array(list(itertools.product(range(V), repeat=len(pos))))
    toks = np.tile(BASE, (len(digits), 1))
    toks[:, pos] = digits
    return toks


def _exact(params, pos, temperature=1.0, top_k=0):
    """Exact probability of every completion (index = its base-V digits in order `pos`) under
    token-by-token sampling in order `pos`, with the temperature and top-k applied per token."""
    toks = _completions(pos)
    groups = np.zeros(T, np.int64)
    groups[pos] = np.arange(1, len(pos) + 1)
    target = np.broadcast_to(~KNOWN, toks.shape)
    if temperature == 1.0 and top_k == 0:
        return np.exp(log_likelihood(CFG, params, toks, groups, target_mask=target).astype(np.float64))
    lp = np.asarray(token_log_probs(CFG, params, toks, groups), np.float64)  # [V^N, T]
    n = len(pos)
    total = np.zeros((V,) * n)
    for j in range(n):  # p(x_j | x_<j) depends on digits 0..j only: read it where the later digits are 0
        cond = lp[:, pos[j]].reshape((V,) * n)[(slice(None),) * (j + 1) + (0,) * (n - j - 1)]
        cond = cond / temperature
        if top_k:
            kth = -np.sort(-cond, axis=-1)[..., top_k - 1:top_k]
            cond = np.where(cond >= kth, cond, -np.inf)
        cond = cond - np.log(np.exp(cond).sum(-1, keepdims=True))
        total = total + cond.reshape(cond.shape + (1,) * (n - j - 1))
    return np.exp(total).reshape(-1)


def _histogram(out, pos):
    idx = np.zeros(len(out), np.int64)
    for p in pos:
        idx = idx * V + out[:, p]
    return np.bincount(idx, minlength=V ** len(pos))


def _chi2_p(counts, probs):
    """p-value of the chi-square test; cells expected below 5 are pooled into one."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    f_obs = np.append(counts[~small], counts[small].sum())
    f_exp = np.append(exp[~small], exp[small].sum())
    if f_exp[-1] == 0:
        assert f_obs[-1] == 0, "samples in cells of probability 0"
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    f_exp = f_exp * f_obs.sum() / f_exp.sum()  # float rounding of the exact probabilities
    return stats.chisquare(f_obs, f_exp).pvalue


def _sample(params, order, seed, spec, temperature=0.0, top_k=0):
    tokens = np.tile(BASE, (SAMPLES, 1))
    known = np.tile(KNOWN, (SAMPLES, 1))
    out = infill(CFG, params, tokens, known, DecodeSpec(order=order, **spec),
                 SamplingParams(temperature, top_k, seed=seed, independent_rows=True)).tokens
    np.testing.assert_array_equal(out[:, KNOWN], tokens[:, KNOWN])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("order_name", ["left_to_right", "user"])
@pytest.mark.parametrize("filtering", [dict(temperature=1.0), dict(temperature=0.8, top_k=2)])
def test_speculative_samples_are_exact(k, order_name, filtering):
    params = _params()
    order = USER if order_name == "user" else order_name
    pos = _order_positions(order)
    probs = _exact(params, pos, **filtering)
    assert abs(probs.sum() - 1) < 1e-4
    out = _sample(params, order, k, dict(speculative=k), **filtering)
    counts = _histogram(out, pos)
    p = _chi2_p(counts, probs)
    assert p > 1e-3, f"speculative k={k} {order_name} {filtering}: chi-square p = {p:.2e}"
    if "top_k" in filtering:  # the filter really acted: completions outside it never appear
        assert counts[probs == 0].sum() == 0 and (probs == 0).sum() > 0


def test_group_wise_decoding_fails_the_same_test():
    """Plain group-wise decoding (4 blanks per step, drawn independently given earlier groups) is not
    the token-by-token distribution, and the test sees it."""
    params = _params()
    pos = _order_positions("left_to_right")
    out = _sample(params, "left_to_right", 4, dict(group_size=4), temperature=1.0)
    p = _chi2_p(_histogram(out, pos), _exact(params, pos))
    assert p < 1e-6, f"group-wise decoding passed the exactness test (p = {p:.2e})"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["left_to_right", "random", "user"])
@pytest.mark.parametrize("k", [2, 3])
def test_greedy_speculative_equals_greedy_token_by_token(order, k):
    cfg, params = tiny()
    tokens, known = batch(seed=2)
    if order == "user":
        order = np.random.default_rng(3).permutation(tokens.shape[1])[None].repeat(3, 0)
    ref = infill(cfg, params, tokens, known, DecodeSpec(order=order, group_size=1))
    res = infill(cfg, params, tokens, known, DecodeSpec(order=order, speculative=k))
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    np.testing.assert_allclose(res.logprobs, ref.logprobs, atol=1e-4)
    assert (res.step[~known] >= 0).all() and (res.step[known] == -1).all()
    # every verify pass accepts its first draft and commits at most one corrected token besides
    verify = np.array([len(np.unique(r[r >= 0])) for r in res.step])
    assert (res.accepted >= verify).all() and (res.accepted <= (~known).sum(1)).all()
    assert (res.accepted + verify >= (~known).sum(1)).all()


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_p=0.9, seed=3)])
def test_cached_equals_uncached(sampling):
    cfg, params = tiny()
    tokens, known = batch(seed=4)
    sp = SamplingParams(**sampling)
    a = infill(cfg, params, tokens, known, DecodeSpec(order="random", speculative=3, use_cache=True), sp)
    b = infill(cfg, params, tokens, known, DecodeSpec(order="random", speculative=3, use_cache=False), sp)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.step, b.step)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert a.num_steps == b.num_steps


@pytest.mark.slow
def test_generate_speculative_and_eos():
    cfg, params = tiny()
    prompts = [[60, 1, 2, 3], [60, 7], [60, 9, 9]]
    ref = generate(cfg, params, prompts, 10, DecodeSpec(stop_at_eos=False)).new
    info = generate(cfg, params, prompts, 10, DecodeSpec(speculative=4, stop_at_eos=False))
    new = info.new
    np.testing.assert_array_equal(new, ref)
    assert info.num_steps <= 2 * 10 + 1  # at most a draft and a verify pass per token
    eos = int(ref[0, 2])  # row 0 must stop right after new position 2
    out = generate(cfg, params, prompts, 10, DecodeSpec(speculative=4, eos_id=eos)).new
    plain = generate(cfg, params, prompts, 10, DecodeSpec(eos_id=eos)).new
    np.testing.assert_array_equal(out, plain)
    assert (out[0, 3:] == cfg.pad_token_id).all()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [dict(speculative=2), dict(group_size=2)])
def test_independent_rows_and_batch_invariance(spec):
    """Both decoders: one key for every row by default (equal rows give equal samples); independent_rows gives row r the key fold_in(PRNGKey(seed), r); per-row seeds."""
    cfg, params = tiny()
    tokens, known = batch(b=1, seed=6)
    many_t, many_k = np.repeat(tokens, 3, 0), np.repeat(known, 3, 0)  # the other tests' [3, 20]: no new compile
    ds = DecodeSpec(order="left_to_right", **spec)

    def sp(**kw):
        return SamplingParams(**dict(dict(temperature=1.0, seed=5), **kw))

    shared = infill(cfg, params, many_t, many_k, ds, sp()).tokens
    assert (shared == shared[0]).all()  # default: every row draws with the same key
    np.testing.assert_array_equal(infill(cfg, params, tokens, known, ds, sp()).tokens[0], shared[0])
    own = infill(cfg, params, many_t, many_k, ds, sp(independent_rows=True)).tokens
    assert len({tuple(r) for r in own}) > 1
    # row r's key is that of sample r of the seed: row 0 of the batch is the row decoded alone, and
    # independent_rows is num_samples over a batch of copies
    np.testing.assert_array_equal(infill(cfg, params, tokens, known, ds, sp(independent_rows=True)).tokens[0], own[0])
    np.testing.assert_array_equal(infill(cfg, params, tokens, known, ds, sp(num_samples=3)).tokens, own)
    # one seed per row: row r with seed s is the row decoded alone with seed s
    per_row = infill(cfg, params, many_t, many_k, ds, sp(seed=np.array([5, 8, 5]))).tokens
    np.testing.assert_array_equal(per_row[0], shared[0])
    np.testing.assert_array_equal(per_row[2], shared[0])
    np.testing.assert_array_equal(per_row[1], infill(cfg, params, tokens, known, ds, sp(seed=8)).tokens[0])
    assert (per_row[1] != per_row[0]).any()


def test_speculative_bad_options():
    cfg, params = tiny()
    tokens, known = batch()
    with pytest.raises(DecodeError, match="fixed order"):
        infill(cfg, params, tokens, known, DecodeSpec(order="confidence", speculative=2))
    with pytest.raises(DecodeError, match="positive int"):
        infill(cfg, params, tokens, known, DecodeSpec(speculative=-1))
    with pytest.raises(DecodeError, match="mode='a3'"):
        infill(cfg, params, tokens, known, DecodeSpec(speculative=2, mode="reference"))
    with pytest.raises(DecodeError, match="teacher_forcing"):
        infill(cfg, params, tokens, known, DecodeSpec(speculative=2, teacher_forcing=True))
