"""The one layout type (a3jax.layout) and the row builders (a3jax.data.rows): defaults, the missing-key
error, the pytree behaviour, and every builder against hand-written arrays."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from a3jax.data import layout_row
from a3jax.data.rows import (blank_rows, context_target_groups, pad_rows, placeholder_id, prompt_groups,
                             strategy_groups, text_row, window_index)
from a3jax.data.tokenizers import ByteTokenizer
from a3jax.layout import LAYOUT_KEYS, Layout, LayoutKeyError, token_range_error, with_defaults
from a3jax.objectives.losses import stream_targets, target_count


def _eq(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- the layout


def test_keys_and_dict_round_trip():
    assert LAYOUT_KEYS == ("tokens", "positions", "groups", "segment_ids", "loss_mask")
    d = {k: np.full((1, 3), i, np.int32) for i, k in enumerate(LAYOUT_KEYS)}
    d["stage"] = np.zeros(1, np.int32)  # pipeline metadata is not part of the layout
    lay = Layout.from_batch(d)
    assert _eq(lay.groups, [[2, 2, 2]]) and _eq(lay.loss_mask, [[4, 4, 4]])
    assert list(lay.as_dict()) == list(LAYOUT_KEYS)
    assert Layout.from_batch(lay) is lay


def test_from_batch_names_the_missing_key():
    d = {k: np.zeros((1, 3), np.int32) for k in LAYOUT_KEYS if k != "segment_ids"}
    with pytest.raises(LayoutKeyError, match="batch has no 'segment_ids'") as e:
        Layout.from_batch(d)
    assert isinstance(e.value, KeyError) and str(e.value).startswith("batch has no 'segment_ids'")
    with pytest.raises(KeyError, match="'loss_mask'"):
        Layout.from_batch({k: np.zeros((1, 3), np.int32) for k in LAYOUT_KEYS[:4]})


def test_defaults():
    lay = with_defaults(np.array([[5, 6, 7, 8], [1, 2, 3, 4]]))
    assert all(x.dtype == jnp.int32 for x in lay)
    assert _eq(lay.positions, [[0, 1, 2, 3], [0, 1, 2, 3]]) and _eq(lay.groups, [[0, 1, 2, 3], [0, 1, 2, 3]])
    assert _eq(lay.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 1]]) and _eq(lay.loss_mask, [[1, 1, 1, 1], [1, 1, 1, 1]])
    # given fields are kept; loss_mask follows the given segments
    lay = with_defaults([9, 9, 9], groups=[0, 0, 1], segment_ids=[1, 1, 0])
    assert _eq(lay.positions, [0, 1, 2]) and _eq(lay.groups, [0, 0, 1])
    assert _eq(lay.loss_mask, [1, 1, 0])
    lay = with_defaults([9, 9], loss_mask=[0, 1], positions=[1, 0])
    assert _eq(lay.loss_mask, [0, 1]) and _eq(lay.positions, [1, 0]) and _eq(lay.segment_ids, [1, 1])


def test_layout_is_a_pytree_under_jit():
    lay = jax.jit(lambda t: with_defaults(t))(jnp.zeros((2, 3), jnp.int32))
    assert isinstance(lay, Layout) and _eq(lay.groups, [[0, 1, 2], [0, 1, 2]])
    doubled = jax.jit(lambda x: jax.tree.map(lambda a: a * 2, x))(lay)
    assert isinstance(doubled, Layout) and _eq(doubled.positions, [[0, 2, 4], [0, 2, 4]])


def test_layout_row_takes_the_tokenizers_bos():
    """A BOS id other than the byte tokenizer's (1 here): the leading BOS is not a target."""
    row = {"tokens": np.array([1, 5, 6, 2, 0]), "positions": np.array([0, 1, 2, 3, 0]),
           "segment_ids": np.array([1, 1, 1, 1, 0])}
    out = layout_row(row, "ar", np.random.default_rng(0), True, 1)
    assert tuple(out) == LAYOUT_KEYS
    assert _eq(out["loss_mask"], [0, 1, 1, 1, 0]) and _eq(out["groups"], [0, 1, 2, 3, 4])
    with pytest.raises(TypeError):
        layout_row(row, "ar", np.random.default_rng(0))  # no silent byte-tokenizer default


def test_stream_targets_shift_once():
    lay = Layout(tokens=jnp.array([[1, 2, 3, 4]]), positions=jnp.array([[0, 1, 0, 1]]),
                 groups=jnp.array([[0, 1, 2, 3]]), segment_ids=jnp.array([[1, 1, 2, 2]]),
                 loss_mask=jnp.array([[0, 1, 1, 1]]))
    tgt, mask = stream_targets(lay, "query")
    assert _eq(tgt, [[1, 2, 3, 4]]) and _eq(mask, [[0, 1, 1, 1]]) and float(target_count(lay)) == 3
    tgt, mask = stream_targets(lay, "content")  # i predicts i+1 within a segment
    assert _eq(tgt, [[2, 3, 4]]) and _eq(mask, [[1, 0, 1]]) and float(target_count(lay, "content")) == 2


# ----------------------------------------------------------------------------- row builders


def test_prompt_groups():
    known = np.array([[1, 1, 0, 1, 1, 1, 0]], bool)
    assert _eq(prompt_groups(known, None), [[0, 0, 0, 0, 0, 0, 0]])
    assert _eq(prompt_groups(known, 1), [[0, 1, 1, 2, 3, 4, 4]])
    assert _eq(prompt_groups(known, 2), [[0, 0, 0, 1, 1, 2, 2]])
    assert _eq(prompt_groups(np.array([[0, 1, 1]], bool), 2), [[0, 0, 0]])


def test_context_target_groups():
    assert _eq(context_target_groups(3, 4, 2, "ar"), [0, 1, 2, 3, 4, 4, 5, 5])
    assert _eq(context_target_groups(3, 4, 2, "one"), [0, 1, 1, 1, 2, 2, 3, 3])
    assert _eq(context_target_groups(3, 3, 1), [0, 1, 2, 3, 4, 5, 6])
    assert _eq(context_target_groups(0, 3, 1), [0, 1, 2, 3])
    assert context_target_groups(2, 2).dtype == np.int32


def test_strategy_groups_and_text_rows():
    assert _eq(strategy_groups("ar", 5, seed=9, index=4), [0, 1, 2, 3, 4])
    assert _eq(strategy_groups("blocks:2", 6, seed=0, index=0), [0, 1, 1, 2, 2, 3])  # BOS anchored
    assert _eq(strategy_groups("blocks:2", 6, 0, 0, anchor_bos=False), [0, 0, 1, 1, 2, 2])
    # random:2 of the 6 positions after BOS, from default_rng([seed, index, 0]): that generator's
    # permutation of 0..5 is [5, 0, 2, 4, 1, 3], cut into pairs (groups 1, 2, 3)
    assert list(np.random.default_rng([3, 5, 0]).permutation(6)) == [5, 0, 2, 4, 1, 3]
    assert _eq(strategy_groups("random:2", 7, seed=3, index=5), [0, 1, 3, 2, 3, 2, 1])
    assert window_index(0, 2) == 2 and window_index(2, 3) == 2_000_009
    ids, groups, target = text_row(256, [10, 11, 12], "ar", 0, 0)
    assert _eq(ids, [256, 10, 11, 12]) and _eq(groups, [0, 1, 2, 3]) and _eq(target, [False, True, True, True])
    assert groups.dtype == np.int32


def test_placeholder_rule():
    assert placeholder_id(ByteTokenizer()) == 259  # MASK
    assert placeholder_id(types.SimpleNamespace(mask_id=None, pad_id=7)) == 7  # no MASK: PAD
    assert placeholder_id(types.SimpleNamespace(pad_id=3)) == 3


def test_blank_rows():
    tokens, known, valid = blank_rows([([5, 6, 7, 8], 1, 2), ([5, 9], 1, 1)], 5, pad_id=0, placeholder=99)
    assert _eq(tokens, [[5, 99, 99, 8, 0], [5, 99, 0, 0, 0]])
    assert _eq(known, [[1, 0, 0, 1, 1], [1, 0, 1, 1, 1]])
    assert _eq(valid, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])


def test_pad_rows():
    lay = pad_rows([([1, 2, 3], [0, 1, 1], [False, True, True])], length=4, batch=2, pad_id=9)
    assert isinstance(lay, Layout) and all(np.asarray(x).dtype == np.int32 for x in lay)
    assert _eq(lay.tokens, [[1, 2, 3, 9], [9, 9, 9, 9]])
    assert _eq(lay.positions, [[0, 1, 2, 3], [0, 1, 2, 3]])
    assert _eq(lay.groups, [[0, 1, 1, 0], [0, 0, 0, 0]])
    assert _eq(lay.segment_ids, [[1, 1, 1, 0], [0, 0, 0, 0]])
    assert _eq(lay.loss_mask, [[0, 1, 1, 0], [0, 0, 0, 0]])


@given(st.lists(st.integers(-5, 20), min_size=0, max_size=12), st.integers(1, 16))
def test_token_range_error_names_an_offending_id_or_none(ids, vocab):
    msg = token_range_error(np.asarray(ids, np.int32), vocab)
    outside = [i for i in ids if not 0 <= i < vocab]
    assert (msg is None) == (not outside)
    if outside:
        assert f"[0, vocab_size={vocab})" in msg and int(msg.split()[2]) in outside
