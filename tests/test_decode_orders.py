"""Orders and sampling on hand-built inputs: schedules, each dynamic criterion, threshold commits,
top-k / top-p filtering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from a3jax.decode import orders, sampling


def _logits(rows):
    """Logits whose softmax is exactly the given probability rows."""
    return jnp.log(jnp.asarray(rows, jnp.float32))[None]


# Four positions over a 4-token vocab, built so the criteria disagree:
#   pos 0: [0.50, 0.50, 0, 0]          max 0.50, margin 0.00, entropy 0.69
#   pos 1: [0.45, 0.15, 0.15, 0.25]    max 0.45, margin 0.20, entropy 1.28
#   pos 2: [0.40, 0.25, 0.20, 0.15]    max 0.40, margin 0.15, entropy 1.32
#   pos 3: [0.30, 0.02, 0.02, 0.66]    max 0.66, margin 0.36, entropy 0.79
P = [[0.50, 0.50, 1e-9, 1e-9],
     [0.45, 0.15, 0.15, 0.25],
     [0.40, 0.25, 0.20, 0.15],
     [0.30, 0.02, 0.02, 0.66]]


@pytest.mark.parametrize("name,first,second", [
    ("confidence", 3, 0),   # max probs 0.50 0.45 0.40 0.66
    ("margin", 3, 1),       # margins 0.00 0.20 0.15 0.36
    ("entropy", 0, 3),      # entropies 0.69 1.28 1.32 0.79
])
def test_criterion_commits_the_best(name, first, second):
    scores = orders.criterion_scores(name, _logits(P), jax.random.PRNGKey(0))
    avail = jnp.ones((1, 4), bool)
    idx, ok = orders.select_top_k(scores, avail, 2)
    assert ok.all()
    assert list(np.asarray(idx[0])) == [first, second]
    # the traced-index form gives the same scores
    i = orders.DYNAMIC_ORDERS.index(name)
    probs = jnp.asarray(P, jnp.float32)[None]
    np.testing.assert_allclose(orders.scores_by_index(i, probs, jnp.zeros((1, 4))), scores, rtol=1e-5, atol=1e-6)
    # an unavailable best is skipped
    avail = avail.at[0, first].set(False)
    idx, ok = orders.select_top_k(scores, avail, 2)
    assert int(idx[0, 0]) == second


def test_random_criterion_is_seeded_and_same_for_every_row():
    logits = jnp.zeros((3, 16, 8))
    a = orders.criterion_scores("random_dynamic", logits, jax.random.PRNGKey(1))
    b = orders.criterion_scores("random_dynamic", logits, jax.random.PRNGKey(1))
    c = orders.criterion_scores("random_dynamic", logits, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    np.testing.assert_array_equal(a[0], a[2])
    assert len(np.unique(np.asarray(a[0]))) == 16


def test_top_k_fewer_available_than_k():
    scores = jnp.asarray([[0.1, 0.9, 0.5]])
    idx, ok = orders.select_top_k(scores, jnp.asarray([[True, False, False]]), 2)
    assert list(np.asarray(ok[0])) == [True, False]
    assert int(idx[0, 0]) == 0


def test_threshold_commits_all_above_or_the_best_one():
    conf = jnp.asarray([[0.9, 0.2, 0.95, 0.7], [0.3, 0.2, 0.4, 0.1]])
    scores = -jnp.asarray([[1.0, 2.0, 3.0, 0.5], [1.0, 0.2, 3.0, 2.0]])  # e.g. -entropy
    avail = jnp.asarray([[True, True, False, True], [True, True, True, True]])
    m = np.asarray(orders.select_threshold(scores, conf, avail, 0.65))
    assert list(m[0]) == [True, False, False, True]  # 0.95 is not available
    assert list(m[1]) == [False, True, False, False]  # none above: the best by the criterion
    none = np.asarray(orders.select_threshold(scores, conf, jnp.zeros_like(avail), 0.65))
    assert not none.any()


@given(st.lists(st.booleans(), min_size=2, max_size=24), st.integers(1, 5), st.integers(0, 3),
       st.sampled_from(["left_to_right", "random", "user"]))
def test_schedule_covers_every_blank_once(blank_list, k, seed, name):
    blank = np.asarray(blank_list)[None]
    if not blank.any():
        blank[0, 0] = True
    if name == "user":
        user = np.random.default_rng(seed).integers(0, 4, blank.shape)
        steps = orders.fixed_steps("user", "groups", user, blank, k, seed)
        # same user value -> same step; larger value -> later step
        vals = user[blank]
        s = steps[blank]
        assert all((s[i] < s[j]) == (vals[i] < vals[j]) for i in range(len(s)) for j in range(len(s)))
    else:
        steps = orders.fixed_steps("fixed", name, None, blank, k, seed)
        assert np.bincount(steps[blank]).max() <= k
        if name == "left_to_right":
            assert (np.diff(steps[blank]) >= 0).all()
    assert (steps[~blank] == -1).all()
    sched = orders.schedule(steps, min_steps=blank.sum())
    got = sorted(int(p) for p in sched.reshape(-1) if p >= 0)
    assert got == list(np.flatnonzero(blank[0]))
    for p in got:
        assert p in sched[0, steps[0, p]]


def test_unknown_order_and_bad_user_grouping():
    with pytest.raises(orders.OrderError, match="unknown order"):
        orders.resolve_order("backwards")
    with pytest.raises(orders.OrderError, match="int array"):
        orders.resolve_order(np.zeros((2, 2, 2), np.int32))
    assert orders.resolve_order("ar")[1] == "left_to_right"


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.3, 0.15, 0.1]]))
    keep = lambda **kw: list(np.isfinite(np.asarray(sampling.filter_logits(logits, **kw)))[0])
    assert keep() == [True] * 5
    assert keep(top_k=2) == [False, True, True, False, False]
    assert keep(top_p=0.5) == [False, True, True, False, False]   # 0.4 < 0.5, 0.4+0.3 >= 0.5
    assert keep(top_p=0.1) == [False, True, False, False, False]  # the best always survives
    assert keep(top_k=3, top_p=0.99) == [False, True, True, True, False]


def test_sample_greedy_and_seeded():
    logits = jnp.log(jnp.asarray([[[0.1, 0.6, 0.3]] * 64]))
    g = sampling.sample(jax.random.PRNGKey(0), logits, 0.0)
    assert (np.asarray(g) == 1).all()
    a = np.asarray(sampling.sample(jax.random.PRNGKey(0), logits, 1.0))
    b = np.asarray(sampling.sample(jax.random.PRNGKey(0), logits, 1.0))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0, 1, 2}
    k1 = np.asarray(sampling.sample(jax.random.PRNGKey(0), logits, 1.0, top_k=1))
    assert (k1 == 1).all()
