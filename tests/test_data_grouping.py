"""Grouping strategies, the row layout and the curriculum: invariants checked with hypothesis."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from a3jax.config import StageConfig
from a3jax.data import (ByteTokenizer, example_rng, group_document, load_curriculum,
                        make_groups, make_row, pack_documents, parse_strategy, register_strategy,
                        stage_for_step, validate_stages)
from a3jax.data.checks import LayoutError, check_batch
from a3jax.data.grouping import infill_blanks, repeat_blanks, strategy_needs_tokens
from a3jax.data.pipeline import ExampleLayout
from a3jax.data.rows import strategy_groups, text_row

TOK = ByteTokenizer()
STRATEGIES = ["ar", "blocks:1", "blocks:2", "blocks:4", "random:1", "random:4", "random:8", "mix:8:0.5",
              "mix:3:1", "mix:3:0", "sizes:uniform:5", "sizes:geometric:0.3", "sizes:geometric:0.5:4",
              "infill", "infill:0.5", "infill:0.3:4:2", "infill:0.3:4:2:ltr", "infill:0.25:8:1:random"]


def sizes_by_group(g):
    return np.bincount(g)


def assert_promised_sizes(strategy, g, length, blank=None):
    """Group sizes (and order where fixed) are what `strategy` promises, for make_groups output g."""
    name, *args = strategy.split(":")
    sizes = sizes_by_group(g)
    assert sizes.sum() == length and np.all(sizes >= 1)
    if name == "ar":
        assert np.array_equal(g, np.arange(length))
    elif name == "blocks":
        k = int(args[0])
        assert np.array_equal(g, np.arange(length) // k)
    elif name in ("random", "mix"):
        k = int(args[0])
        assert np.all(sizes[:-1] == k) and 1 <= sizes[-1] <= k
        if name == "mix" and float(args[1]) == 0:
            assert np.array_equal(g, np.arange(length) // k)
    elif name == "sizes":
        if args[0] == "uniform":
            assert sizes.max() <= int(args[1])
        elif len(args) > 2:
            assert sizes.max() <= int(args[2])
    elif name == "infill":
        k = int(args[2]) if len(args) > 2 else 4
        assert sizes.max() <= k
        if blank is not None:  # exact: context first, left to right, one per group; then blanks by k
            ctx = np.flatnonzero(~blank)
            assert np.array_equal(g[ctx], np.arange(len(ctx))), "context is left to right, first"
            bs = sizes[len(ctx):]
            assert bs.sum() == blank.sum()
            if len(bs):
                assert np.all(bs[:-1] == k) and 1 <= bs[-1] <= k
            if len(args) > 3 and args[3] == "ltr":  # the blanks in position order too
                b = np.flatnonzero(blank)
                assert np.array_equal(g[b], len(ctx) + np.arange(len(b)) // k)


@given(strategy=st.sampled_from(STRATEGIES), length=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_make_groups_invariants(strategy, length, seed):
    g = make_groups(strategy, length, np.random.default_rng(seed))
    assert g.dtype == np.int32 and g.shape == (length,)
    # every position in exactly one group; ids dense 0..K-1
    assert np.array_equal(np.unique(g), np.arange(g.max() + 1))
    blank = None
    if strategy.startswith("infill"):
        a = strategy.split(":")[1:]
        rate, span = (float(a[0]) if a else 0.25), (int(a[1]) if len(a) > 1 else 8)
        blank = infill_blanks(length, np.random.default_rng(seed), rate, span)
        assert not blank[0] and (length == 1 or blank.sum() >= 1)
    assert_promised_sizes(strategy, g, length, blank)
    # deterministic from the rng
    assert np.array_equal(g, make_groups(strategy, length, np.random.default_rng(seed)))


@given(strategy=st.sampled_from(STRATEGIES), length=st.integers(2, 200), seed=st.integers(0, 1000))
def test_anchor_bos_alone_first(strategy, length, seed):
    g = group_document(strategy, length, np.random.default_rng(seed), anchor_bos=True)
    assert g[0] == 0 and np.sum(g == 0) == 1
    inner = make_groups(strategy, length - 1, np.random.default_rng(seed))
    assert np.array_equal(g[1:], inner + 1)


def test_random_strategies_really_permute():
    g = make_groups("random:4", 64, np.random.default_rng(0))
    assert not np.array_equal(g, np.arange(64) // 4)  # not contiguous
    g2 = make_groups("random:4", 64, np.random.default_rng(1))
    assert not np.array_equal(g, g2)
    # mix draws both kinds across documents
    kinds = {np.array_equal(make_groups("mix:4:0.5", 32, np.random.default_rng(s)), np.arange(32) // 4)
             for s in range(20)}
    assert kinds == {True, False}


def test_infill_blank_rate_and_spans():
    rng = np.random.default_rng(3)
    blank = infill_blanks(1000, rng, 0.3, 8)
    assert not blank[0]
    assert abs(blank.sum() - 300) <= 8
    g = make_groups("infill:0.3:8:4", 1000, np.random.default_rng(3))
    n_ctx = 1000 - int(infill_blanks(1000, np.random.default_rng(3), 0.3, 8).sum())
    assert int(np.sum(np.bincount(g) == 1)) >= n_ctx - 1


def test_infill_blank_orders_differ_only_in_the_blanks():
    """`ltr` and `random` draw the same blanks and context order; random really shuffles the blanks."""
    blank = infill_blanks(400, np.random.default_rng(5), 0.25, 8)
    g_ltr = make_groups("infill:0.25:8:1:ltr", 400, np.random.default_rng(5))
    g_rnd = make_groups("infill:0.25:8:1", 400, np.random.default_rng(5))
    assert np.array_equal(g_ltr[~blank], g_rnd[~blank])
    assert np.all(np.diff(g_ltr[blank]) == 1)
    assert not np.all(np.diff(g_rnd[blank]) > 0)
    assert np.array_equal(np.sort(g_rnd[blank]), g_ltr[blank])


@pytest.mark.parametrize("bad", ["", "nope", "blocks", "blocks:0", "blocks:x", "random:4:5", "mix:4:2",
                                 "sizes", "sizes:poisson:3", "sizes:uniform:0", "infill:1.5", "ar:3",
                                 "infill:0.25:8:1:rtl", "infill:0.25:8:1:ltr:2"])
def test_bad_strategy_strings(bad):
    with pytest.raises(ValueError) as e:
        parse_strategy(bad)
    assert "strategy" in str(e.value)


def test_register_new_strategy_is_one_function():
    @register_strategy("reverse_test")
    def _rev(length, rng, *args):
        return np.arange(length)[::-1]

    g = make_groups("reverse_test", 5, np.random.default_rng(0))
    assert list(g) == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("ar")(lambda length, rng: np.arange(length))


# ----------------------------------------------------------------------------- row layout


@st.composite
def packed_docs(draw):
    n = draw(st.integers(1, 6))
    docs = [draw(st.lists(st.integers(0, 255), min_size=0, max_size=90)) for _ in range(n)]
    seq_len = draw(st.integers(8, 64))
    return docs, seq_len


@given(data=packed_docs(), strategy=st.sampled_from(STRATEGIES), seed=st.integers(0, 10_000),
       anchor=st.booleans())
def test_layout_invariants(data, strategy, seed, anchor):
    docs, seq_len = data
    b = pack_documents(docs, seq_len, TOK, strategy=strategy, seed=seed, anchor_bos=anchor)
    rows = check_batch(b, TOK.vocab_size, TOK.pad_id, TOK.bos_id, anchor_bos=anchor)
    # reassemble documents from the segments (pieces of split documents concatenate back)
    stream = []
    for segs in rows:
        for s in segs:
            t = list(s["tokens"])
            assert t[0] == TOK.bos_id
            stream.extend(t[1:])
            # group sizes per segment as promised (after the anchor)
            g = s["groups"][np.argsort(s["positions"])]
            if anchor and len(g) > 1:
                assert g[0] == 0 and np.sum(g == 0) == 1
                assert_promised_sizes(strategy, g[1:] - 1, len(g) - 1)
            elif not anchor:
                assert_promised_sizes(strategy, g, len(g))
            if strategy == "ar":
                assert np.array_equal(s["positions"], np.arange(len(g)))
                assert np.array_equal(s["groups"], np.arange(len(g)))
    expected = []
    for d in docs:
        expected.extend(d + [TOK.eos_id])
    assert stream == expected


def test_layout_sorted_by_segment_then_group_with_positions_carried():
    b = make_row("abcdefghij", TOK, seq_len=16, strategy="random:3", seed=5)
    tok, pos, grp = b["tokens"][0], b["positions"][0], b["groups"][0]
    text = [TOK.bos_id] + TOK.encode("abcdefghij") + [TOK.eos_id]
    # token at each slot is the token of its original position
    for t, p, s in zip(tok, pos, b["segment_ids"][0]):
        if s:
            assert t == text[p]
    assert list(grp[:1]) == [0] and np.all(np.diff(grp) >= 0)
    assert b["segment_ids"][0][-1] == 0 and b["tokens"][0][-1] == TOK.pad_id  # 12 tokens + 4 padding
    assert b["loss_mask"][0].sum() == 11  # everything but BOS


def test_layout_two_documents_groups_offset_not_mixed():
    b = pack_documents(["abc", "defgh"], 16, TOK, strategy="ar")
    assert list(b["segment_ids"][0]) == [1] * 5 + [2] * 7 + [0] * 4
    assert list(b["positions"][0][:12]) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert list(b["groups"][0]) == list(range(12)) + [12] * 4


def test_long_document_split_into_bos_pieces():
    b = pack_documents(["x" * 25], 8, TOK, strategy="ar")
    # pieces of 7 tokens: BOS + 7 | BOS + 7 | BOS + 7 | BOS + 4 + EOS
    segs = b["segment_ids"]
    assert b["tokens"].shape == (4, 8)
    assert np.all(b["tokens"][:, 0] == TOK.bos_id) and np.all(segs[:3] == 1)
    assert b["tokens"][3, 5] == TOK.eos_id and np.all(b["tokens"][:3] != TOK.eos_id)


def test_check_batch_catches_violations():
    b = pack_documents(["hello", "world"], 16, TOK, strategy="random:2", seed=1)
    check_batch(b, TOK.vocab_size, TOK.pad_id, TOK.bos_id)
    bad = {k: v.copy() for k, v in b.items()}
    bad["groups"][0, 3], bad["groups"][0, 4] = bad["groups"][0, 4] + 1, bad["groups"][0, 3]
    with pytest.raises(LayoutError):
        check_batch(bad, TOK.vocab_size, TOK.pad_id, TOK.bos_id)
    bad = {k: v.copy() for k, v in b.items()}
    bad["tokens"][0, 2] = 999
    with pytest.raises(LayoutError, match=r"token id 999 is outside \[0, vocab_size=260\)"):
        check_batch(bad, TOK.vocab_size, TOK.pad_id, TOK.bos_id)
    with pytest.raises(ValueError):  # bad input, not a failed assertion
        check_batch(bad, TOK.vocab_size, TOK.pad_id, TOK.bos_id)
    bad = {k: v.copy() for k, v in b.items()}
    bad["segment_ids"][0, 8] = 1  # a token of document 2 labelled as document 1
    with pytest.raises(LayoutError):
        check_batch(bad, TOK.vocab_size, TOK.pad_id, TOK.bos_id)


def test_make_row_too_long():
    with pytest.raises(ValueError, match="does not fit"):
        make_row("x" * 20, TOK, seq_len=8)


# ----------------------------------------------------------------------------- curriculum


def test_stage_for_step_switches_and_stays_on_last():
    stages = (StageConfig("ar", 2), StageConfig("blocks:2", 3), StageConfig("random:4", 1))
    got = [stage_for_step(stages, s) for s in range(8)]
    assert got == [(0, "ar"), (0, "ar"), (1, "blocks:2"), (1, "blocks:2"), (1, "blocks:2"),
                   (2, "random:4"), (2, "random:4"), (2, "random:4")]
    assert stage_for_step([("ar", 1)], 10**9) == (0, "ar")
    with pytest.raises(ValueError):
        stage_for_step(stages, -1)


def test_paper_curriculum_file():
    stages = load_curriculum("paper")
    assert [(s.strategy, s.steps) for s in stages] == [
        ("ar", 800), ("blocks:2", 800), ("blocks:4", 800), ("random:4", 800), ("random:8", 800)]
    assert stage_for_step(stages, 800 * 3) == (3, "random:4")
    demo = load_curriculum("curriculum/short")
    assert sum(s.steps for s in demo) < 400 and demo[-1].strategy == "random:8"


def test_validate_stages_names_the_bad_stage():
    with pytest.raises(ValueError, match=r"data.stages\[1\].strategy"):
        validate_stages((StageConfig("ar", 1), StageConfig("random:x", 1)))
    with pytest.raises(ValueError, match="steps"):
        validate_stages((StageConfig("ar", 0),))


def test_example_rng_depends_on_seed_and_index():
    a = example_rng(0, 5).integers(0, 1 << 30, 4)
    assert np.array_equal(a, example_rng(0, 5).integers(0, 1 << 30, 4))
    assert not np.array_equal(a, example_rng(1, 5).integers(0, 1 << 30, 4))
    assert not np.array_equal(a, example_rng(0, 6).integers(0, 1 << 30, 4))


# ----------------------------------------------------------------------------- copyable blanks (repeat)


def runs_of(mask):
    """(start, end) of each maximal run of True."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return list(zip(d[::2].tolist(), d[1::2].tolist()))


def occurs_in_context(tokens, blank, s, e):
    """Whether tokens[s:e] occurs at some other start whose positions are all context."""
    n = e - s
    return any(j != s and not blank[j:j + n].any() and np.array_equal(tokens[j:j + n], tokens[s:e])
               for j in range(len(tokens) - n + 1))


# few symbols make repeats common; many make the fallback needed
docs_tokens = st.integers(2, 40).flatmap(lambda v: st.lists(st.integers(0, v), min_size=1, max_size=300))


@given(tokens=docs_tokens, rate=st.sampled_from([0.05, 0.25, 0.5, 1.0]), span=st.integers(2, 10),
       seed=st.integers(0, 2**31))
def test_repeat_blanks_are_copyable(tokens, rate, span, seed):
    t = np.asarray(tokens)
    blank, spans = repeat_blanks(t, np.random.default_rng(seed), rate, span)
    L = len(t)
    assert blank.shape == (L,) and blank.dtype == bool
    assert L <= 1 or not blank[0]
    target = max(1, round(rate * (L - 1))) if L > 1 else 0
    assert blank.sum() <= target
    runs = set(runs_of(blank))
    for s, e in spans:
        assert 2 <= e - s <= span and s >= 1
        assert len(set(t[s:e].tolist())) >= 2, "not one token repeated"
        assert (s, e) in runs, "a copy span is a run of blanks of its own"
        assert occurs_in_context(t, blank, s, e), "its tokens occur elsewhere, all context"
    # without the fallback every run of blanks is a copy span
    if sum(e - s for s, e in spans) == blank.sum():
        assert runs == set(spans)
    # deterministic from the rng
    b2, s2 = repeat_blanks(t, np.random.default_rng(seed), rate, span)
    assert np.array_equal(blank, b2) and s2 == spans


@given(length=st.integers(200, 400), rate=st.sampled_from([0.1, 0.25, 0.4]), seed=st.integers(0, 2**31))
def test_repeat_blanks_rate_on_repetitive_text(length, rate, seed):
    """Four symbols drawn at random: every short n-gram repeats, so copy spans (not the fallback)
    reach ~rate."""
    t = np.random.default_rng(seed).integers(0, 4, length)
    blank, spans = repeat_blanks(t, np.random.default_rng(seed), rate, 8)
    target = round(rate * (length - 1))
    assert target - 1 <= blank.sum() <= target
    assert sum(e - s for s, e in spans) >= 0.8 * target
    # longest first: the copy spans are not mostly the shortest
    assert np.mean([e - s for s, e in spans]) > 3


@pytest.mark.parametrize("t", [np.arange(100), np.zeros(100, int)])
def test_repeat_blanks_fall_back_when_nothing_repeats(t):
    """No n-gram occurs twice, or only runs of one token do (copying them teaches nothing): every
    blank comes from the fallback."""
    blank, spans = repeat_blanks(t, np.random.default_rng(0), 0.25, 8)
    assert spans == [] and blank.sum() == round(0.25 * 99) and not blank[0]


def test_repeat_blanks_pick_the_repeated_names_in_code():
    text = "def area(width, height):\n    return width * height\n"
    t = np.asarray(TOK.encode(text))
    blank, spans = repeat_blanks(t, np.random.default_rng(0), 0.25, 8)
    assert spans and sum(e - s for s, e in spans) == blank.sum()
    for s, e in spans:
        assert text.count(TOK.decode(t[s:e].tolist())) >= 2


@given(tokens=st.lists(st.integers(0, 5), min_size=1, max_size=200), seed=st.integers(0, 10_000),
       order=st.sampled_from(["random", "ltr"]), k=st.integers(1, 4))
def test_infill_repeat_groups(tokens, seed, order, k):
    t = np.asarray(tokens)
    strategy = f"infill:0.3:6:{k}:{order}:repeat"
    g = make_groups(strategy, len(t), np.random.default_rng(seed), tokens=t)
    blank, _ = repeat_blanks(t, np.random.default_rng(seed), 0.3, 6)
    assert_promised_sizes(strategy, g, len(t), blank)
    assert np.array_equal(g, make_groups(strategy, len(t), np.random.default_rng(seed), tokens=t))


@given(strategy=st.sampled_from([s for s in STRATEGIES if s.startswith("infill")]),
       tokens=st.lists(st.integers(0, 9), min_size=1, max_size=200), seed=st.integers(0, 10_000))
def test_infill_any_is_the_default_and_ignores_tokens(strategy, tokens, seed):
    t = np.asarray(tokens)
    a = strategy.split(":")[1:]
    full = "infill:" + ":".join((a + ["", "", "", ""])[:4] + ["any"])
    ref = make_groups(strategy, len(t), np.random.default_rng(seed))
    assert np.array_equal(ref, make_groups(full, len(t), np.random.default_rng(seed)))
    assert np.array_equal(ref, make_groups(strategy, len(t), np.random.default_rng(seed), tokens=t))
    assert np.array_equal(ref, make_groups(full, len(t), np.random.default_rng(seed), tokens=t))


@pytest.mark.parametrize("bad, named", [("infill:0.25:8:1:random:near", "'near'"),
                                        ("infill:0.25:1:1:random:repeat", "got 1"),
                                        ("infill:0.25:8:1:random:repeat:3", "at most 5")])
def test_infill_where_bad_args(bad, named):
    with pytest.raises(ValueError, match=f"bad grouping strategy '{bad}'") as e:
        parse_strategy(bad)
    assert named in str(e.value)


def test_repeat_needs_tokens_and_says_so():
    s = "infill:0.25:8:1:random:repeat"
    assert strategy_needs_tokens(s) and not strategy_needs_tokens("infill:0.25:8:1") and not strategy_needs_tokens("ar")
    with pytest.raises(ValueError, match=r"'infill:0.25:8:1:random:repeat' needs the document's token ids"):
        make_groups(s, 20, np.random.default_rng(0))
    with pytest.raises(ValueError, match="3 token ids for length 20"):
        make_groups(s, 20, np.random.default_rng(0), tokens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"'infill:0.25:8:1:random:repeat' needs each document's token ids.*batch"):
        ExampleLayout([(s, 10)], 4, 0, True, TOK.bos_id, grouping_scope="batch")


def test_group_document_gives_the_strategy_the_text_after_bos():
    t = np.asarray([TOK.bos_id] + TOK.encode("ab ab ab cd cd ab cd ab cd"))
    s = "infill:0.3:4:1:ltr:repeat"
    g = group_document(s, len(t), np.random.default_rng(2), anchor_bos=True, tokens=t)
    assert np.array_equal(g[1:] - 1, make_groups(s, len(t) - 1, np.random.default_rng(2), tokens=t[1:]))


@given(data=packed_docs(), seed=st.integers(0, 10_000), anchor=st.booleans())
def test_layout_repeat_blanks_per_segment(data, seed, anchor):
    """pack_documents hands each segment's own tokens to the strategy: its groups are those of
    group_document on that segment's tokens, with that row's example_rng."""
    docs, seq_len = data
    strategy = "infill:0.3:4:1:ltr:repeat"
    b = pack_documents(docs, seq_len, TOK, strategy=strategy, seed=seed, anchor_bos=anchor)
    rows = check_batch(b, TOK.vocab_size, TOK.pad_id, TOK.bos_id, anchor_bos=anchor)
    for r, segs in enumerate(rows):
        rng = example_rng(seed, r)
        for s in segs:
            order = np.argsort(s["positions"])
            tok, g = np.asarray(s["tokens"])[order], np.asarray(s["groups"])[order]
            want = group_document(strategy, len(tok), rng, anchor, tokens=tok)
            assert np.array_equal(g - g.min(), want)


def test_text_row_hands_its_tokens_to_the_strategy():
    ids = TOK.encode("x = value\ny = value\n")
    row, groups, target = text_row(TOK.bos_id, ids, "infill:0.3:8:1:ltr:repeat", seed=3, index=7)
    assert np.array_equal(groups, strategy_groups("infill:0.3:8:1:ltr:repeat", len(row), 3, 7, tokens=row))
    blank, _ = repeat_blanks(row[1:], example_rng(3, 7), 0.3, 8)
    assert blank.any() and np.all(groups[1:][blank] > groups[1:][~blank].max())  # blanks after the context
    with pytest.raises(ValueError, match="needs the document's token ids"):
        strategy_groups("infill:0.3:8:1:ltr:repeat", len(row), 3, 7)
