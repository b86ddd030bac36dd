"""KV-cached any-order decoding: cached == uncached for every order, exact teacher-forced log-probs,
known tokens kept, batch == rows, reference semantics, sampling determinism, EOS, bad input."""

import numpy as np
import pytest

from a3jax.decode import DecodeError, DecodeSpec, SamplingParams, generate, infill
from a3jax.model import forward
from a3jax.score import log_likelihood
from test_decode_common import batch, tiny

FIXED = ["left_to_right", "random", "user"]
DYNAMIC = ["confidence", "entropy", "margin", "random_dynamic"]


def _user_grouping(known, seed=1, size=2):
    """Random grouping of the blanks: a permutation cut into groups of `size` (values at known
    positions are ignored by infill)."""
    rng = np.random.default_rng(seed)
    g = np.zeros(known.shape, np.int64)
    for r in range(known.shape[0]):
        idx = np.flatnonzero(~known[r])
        g[r, rng.permutation(idx)] = np.arange(len(idx)) // size + 1
    return g


def _order(name, known):
    return _user_grouping(known) if name == "user" else name


def _check_same(a, b, tokens, known):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_array_equal(a.step, b.step)
    assert a.num_steps == b.num_steps
    # known tokens never change; every blank got filled
    np.testing.assert_array_equal(a.tokens[known], tokens[known])
    assert (a.step[~known] >= 0).all() and (a.step[known] == -1).all()


@pytest.mark.slow
@pytest.mark.parametrize("order", FIXED + DYNAMIC)
def test_cached_equals_uncached(order):
    cfg, params = tiny()
    tokens, known = batch()
    kw = dict(order=_order(order, known), group_size=2)
    a = infill(cfg, params, tokens, known, DecodeSpec(use_cache=True, **kw))
    b = infill(cfg, params, tokens, known, DecodeSpec(use_cache=False, **kw))
    _check_same(a, b, tokens, known)
    assert a.num_steps == 5  # 9 blanks, 2 per step
    # each step commits at most 2 blanks per row
    for r in range(3):
        assert np.bincount(a.step[r][a.step[r] >= 0]).max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [0.2, 0.999])
def test_cached_equals_uncached_threshold(threshold):
    cfg, params = tiny()
    tokens, known = batch()
    kw = dict(order="confidence", threshold=threshold)
    a = infill(cfg, params, tokens, known, DecodeSpec(use_cache=True, **kw))
    b = infill(cfg, params, tokens, known, DecodeSpec(use_cache=False, **kw))
    _check_same(a, b, tokens, known)
    if threshold > 0.99:  # nothing is that confident: exactly one commit per step
        assert a.num_steps == 9
    else:
        assert a.num_steps < 9


def test_matches_naive_loop_over_forward():
    """The cached loop equals a naive Python loop of full `forward` calls: known tokens in group 0,
    the blanks of step s in group s + 1, greedy at the blanks of the next step."""
    cfg, params = tiny()
    tokens, known = batch(seed=3)
    out = infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", group_size=2)).tokens
    cur = tokens.copy()
    for r in range(3):
        groups = np.where(known[r], 0, 10_000)[None]
        blanks = np.flatnonzero(~known[r])
        for step in range(5):
            pos = blanks[2 * step:2 * step + 2]
            logits = np.asarray(forward(cfg, params, cur[r:r + 1], groups=groups))[0]
            cur[r, pos] = np.argmax(logits[pos], axis=-1)
            groups[0, pos] = step + 1
    np.testing.assert_array_equal(out, cur)


def test_teacher_forced_logprobs_equal_log_likelihood():
    """For random groupings (blanks as random groups after the context; the context as one group or
    as AR chunks), the per-step conditionals collected while decoding with teacher forcing sum to
    log_likelihood of the same grouping in one forward pass."""
    cfg, params = tiny()
    for seed in range(4):
        tokens, known = batch(seed=seed)
        user = _user_grouping(known, seed=seed + 10, size=2)
        chunk = None if seed % 2 == 0 else 3
        res = infill(cfg, params, tokens, known, DecodeSpec(order=user, prompt_group_size=chunk, teacher_forcing=True))
        np.testing.assert_array_equal(res.tokens, tokens)  # forced: nothing changes
        # the same grouping as score input: context groups first, then the user's groups in order
        if chunk is None:
            kg = np.zeros(known.shape, np.int64)
        else:
            kg = (np.cumsum(known, axis=1) - 1) // chunk
        groups = np.where(known, kg, 1000 + user)
        ll = log_likelihood(cfg, params, tokens, groups, target_mask=~known)
        steps_sum = np.where(~known, res.logprobs, 0).sum(1)
        np.testing.assert_allclose(steps_sum, ll, rtol=1e-5, atol=1e-4)
        # and one step's conditionals are real log-probs (not all equal, all negative)
        assert (res.logprobs[~known] < 0).all()


def test_batch_equals_rows_one_by_one():
    cfg, params = tiny()
    tokens, known = batch(seed=5)
    for spec, sp in ((DecodeSpec(order="random", group_size=2), SamplingParams(temperature=0.9, top_p=0.95, seed=7)),
                     (DecodeSpec(order="confidence", group_size=2), None)):
        full = infill(cfg, params, tokens, known, spec, sp).tokens
        for r in range(3):
            one = infill(cfg, params, tokens[r:r + 1], known[r:r + 1], spec, sp).tokens
            np.testing.assert_array_equal(one[0], full[r])


def test_sampling_deterministic_given_seed():
    cfg, params = tiny()
    tokens, known = batch(seed=5)
    spec = DecodeSpec(order="random", group_size=2)
    a = infill(cfg, params, tokens, known, spec, SamplingParams(temperature=0.9, top_p=0.95, seed=7)).tokens
    b = infill(cfg, params, tokens, known, spec, SamplingParams(temperature=0.9, top_p=0.95, seed=7)).tokens
    c = infill(cfg, params, tokens, known, spec, SamplingParams(temperature=0.9, top_p=0.95, seed=8)).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a[known], tokens[known])
    greedy = infill(cfg, params, tokens, known, DecodeSpec(order="random", group_size=2), SamplingParams(seed=7)).tokens
    assert (a != greedy).any()  # temperature really samples


def test_padding_rows_of_different_lengths():
    """A short row padded with valid=False gives the same tokens as that row alone, unpadded."""
    cfg, params = tiny()
    tokens, known = batch(seed=9)
    valid = np.ones_like(known)
    valid[1, 14:] = False
    known[1, 14:] = True  # ignored where not valid
    known[1, :14] = known[0, :14]
    if known[1, :14].all():
        known[1, 5] = False
    full = infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", group_size=2), valid=valid).tokens
    one = infill(cfg, params, tokens[1:, :14], known[1:, :14], DecodeSpec(order="left_to_right", group_size=2)).tokens
    np.testing.assert_array_equal(full[1, :14], one[0])
    np.testing.assert_array_equal(full[1, 14:], tokens[1, 14:])  # padding untouched


def test_reference_mode_matches_reference_loop():
    """mode='reference': committed tokens (known or generated) form one group 0, blanks group 1,
    recomputed each step; dynamic confidence commits the most confident blank."""
    cfg, params = tiny()
    tokens, known = batch(b=1, seed=11)
    out = infill(cfg, params, tokens, known, DecodeSpec(order="confidence", group_size=1, mode="reference")).tokens
    cur, filled = tokens.copy(), known.copy()
    for _ in range(9):
        logits = np.asarray(forward(cfg, params, cur, groups=np.where(filled, 0, 1)))[0]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        conf = np.where(filled[0], -1, probs.max(-1))
        pos = int(np.argmax(conf))
        cur[0, pos] = int(np.argmax(logits[pos]))
        filled[0, pos] = True
    np.testing.assert_array_equal(out, cur)


PROMPTS = [[60, 1, 2, 3], [60, 7], [60, 9, 9]]


def test_generate_plain_ar_cached_equals_uncached_and_infill():
    """generate = left-to-right infill of the positions after each (ragged) prompt; group_size 1 is
    plain AR, cached == uncached."""
    cfg, params = tiny()
    ia = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False))
    ib = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False, use_cache=False))
    a, b = ia.new, ib.new
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ia.logprobs, ib.logprobs, atol=1e-4)
    assert ia.num_steps == 8
    tokens = np.zeros((3, 12), np.int32)
    known = np.zeros((3, 12), bool)
    for r, p in enumerate(PROMPTS):
        tokens[r, :len(p)], known[r, :len(p)] = p, True
    valid = np.arange(12)[None] < np.array([len(p) + 8 for p in PROMPTS])[:, None]
    filled = infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", group_size=1), valid=valid).tokens
    for r, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(a[r], filled[r, len(p):len(p) + 8])


def test_generate_eos_ends_a_row():
    cfg, params = tiny()
    free = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False)).new
    # call the token row 0 generates at new position 3 the EOS: row 0 must stop right there
    eos = int(free[0, 3])
    info = generate(cfg, params, PROMPTS, 8, DecodeSpec(eos_id=eos))
    out = info.new
    for r in range(3):
        hits = np.flatnonzero(free[r] == eos)
        if len(hits):
            e = hits[0]
            np.testing.assert_array_equal(out[r, :e + 1], free[r, :e + 1])
            assert (out[r, e + 1:] == cfg.pad_token_id).all()
        else:
            np.testing.assert_array_equal(out[r], free[r])
    assert (out[0] == cfg.pad_token_id).any()
    if all((free[r] == eos).any() for r in range(3)):
        assert info.num_steps < 8


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    cfg, params = tiny()
    tokens, known = batch()
    with pytest.raises(DecodeError, match="no blanks"):
        infill(cfg, params, tokens, np.ones_like(known))
    with pytest.raises(DecodeError, match="every position is blank"):
        infill(cfg, params, tokens, np.zeros_like(known))
    with pytest.raises(DecodeError, match="known has shape"):
        infill(cfg, params, tokens, known[:, :5])
    with pytest.raises(DecodeError, match="unknown order 'sideways'"):
        infill(cfg, params, tokens, known, DecodeSpec(order="sideways"))
    with pytest.raises(DecodeError, match="group_size"):
        infill(cfg, params, tokens, known, DecodeSpec(group_size=0))
    with pytest.raises(DecodeError, match="threshold=0.5 applies"):
        infill(cfg, params, tokens, known, DecodeSpec(order="left_to_right", threshold=0.5))
    with pytest.raises(DecodeError, match="mode"):
        infill(cfg, params, tokens, known, DecodeSpec(mode="diffusion"))
    with pytest.raises(DecodeError, match="outside"):
        infill(cfg, params, tokens + 100, known)
    long = np.zeros((1, 200), np.int32)
    with pytest.raises(DecodeError, match="exceeds"):
        infill(cfg, params, long, np.arange(200)[None] < 10)
    with pytest.raises(DecodeError, match="exceeds max_position_embeddings"):
        generate(cfg, params, [[60] * 100], 64)
    with pytest.raises(DecodeError, match="empty"):
        generate(cfg, params, [[60], []], 4)
    with pytest.raises(DecodeError, match="user grouping has shape"):
        infill(cfg, params, tokens, known, DecodeSpec(order=np.zeros((3, 7), np.int64)))
