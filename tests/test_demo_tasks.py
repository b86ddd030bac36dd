"""The demo's any-order tasks: each blank kind is what it says (the right context decides a
`right_context` answer, the prefix a `prefix_suffices` one), the held-out items are never trained on."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from a3jax import demo_tasks as dt

CLOSER = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _partner(text, i):
    """The offset of the bracket matching the one at i (by scanning, independently of the module)."""
    step, me, other = (1, text[i], CLOSER[text[i]]) if text[i] in CLOSER else \
        (-1, text[i], {v: k for k, v in CLOSER.items()}[text[i]])
    depth, j = 0, i
    while True:
        depth += text[j] == me
        depth -= text[j] == other
        if depth == 0:
            return j
        j += step


def test_blanks_need_what_their_kind_says():
    items = dt.eval_items(40, seed=0)
    assert {(it["task"], it["kind"]) for it in items} == {(t, k) for t in dt.TASKS for k in dt.KINDS}
    for it in items:
        text, a, b, kind = it["text"], it["start"], it["end"], it["kind"]
        ans = text[a:b]
        if it["task"] == "mirror":
            word, mirror = text.split("=")
            assert mirror == word[::-1] and len(ans) == 3 and 4 <= len(word) <= 8
            if kind == "right_context":  # in the word; the mirror (to its right) spells it backwards
                assert b <= len(word) and ans[::-1] in mirror
            else:  # in the mirror: the word before it spells it
                assert a > len(word) and ans[::-1] in word
        elif it["task"] == "tag":
            name = text[1:text.index(">")]
            assert text.endswith(f"</{name}>") and ans == name and 3 <= len(name) <= 5
            # right_context: the opening name (the closer names it); prefix_suffices: the closing one
            assert (a == 1) == (kind == "right_context")
        else:
            j = _partner(text, a)
            assert len(ans) == 1 and (j > a) == (kind == "right_context")
            assert CLOSER[text[min(a, j)]] == text[max(a, j)]


def test_held_out_items_are_seeded_and_never_trained_on():
    train = dt.training_examples(2000, seed=0)
    assert train == dt.training_examples(2000, seed=0) and len(train) == 3 * 2000
    items = dt.eval_items(20, seed=0, exclude=set(train))
    assert items == dt.eval_items(20, seed=0, exclude=set(train))
    assert not {it["text"] for it in items} & set(train)
    both = dt.both_items(10, seed=0, exclude=set(train))
    assert not {it["text"] for it in both} & set(train)


def test_both_items_blank_mirrored_letters_and_consistency_checks_the_halves():
    for it in dt.both_items(20, seed=3):
        text = it["text"]
        (a, b), (c, d) = it["spans"]
        assert text[a:b][::-1] == text[c:d] and text.index("=") < c
        assert dt.consistent(it, text)
        other = "z" if text[c] != "z" else "y"  # one letter of the mirror half changed
        assert not dt.consistent(it, text[:c] + other + text[c + 1:])


def test_chance_is_a_uniform_guess_of_the_answer():
    assert dt.chance("brackets", "(") == pytest.approx(0.25)
    assert dt.chance("mirror", "abc") == pytest.approx(26.0 ** -3)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2 ** 31))
def test_bracket_examples_are_well_formed(seed):
    text = dt.make_example("brackets", random.Random(seed))
    stack = []
    for c in text:
        if c in CLOSER:
            stack.append(c)
        else:
            assert stack and CLOSER[stack.pop()] == c, text
    assert not stack and 6 <= len(text) <= 12


def test_unknown_task_and_kind_are_named():
    with pytest.raises(ValueError, match="'poem'"):
        dt.make_example("poem", random.Random(0))
    with pytest.raises(ValueError, match="'middle'"):
        dt.blank("mirror", "abcd=dcba", "middle", random.Random(0))


def test_corpus_keeps_code_keys_and_writes_the_examples(tmp_path):
    import json

    src = tmp_path / "src" / "pkg"
    src.mkdir(parents=True)
    (src / "m.py").write_text("x = 1\n")
    out = dt.write_corpus(str(tmp_path / "corpus"), [("pkg/m.py", str(src / "m.py"))], ["ab=ba", "<a>b</a>"])
    assert (tmp_path / "corpus" / "pkg" / "m.py").read_text() == "x = 1\n"
    lines = (tmp_path / "corpus" / "tasks.jsonl").read_text().splitlines()
    assert [json.loads(l)["text"] for l in lines] == ["ab=ba", "<a>b</a>"] and out == str(tmp_path / "corpus")


def test_tasks_config_errors_name_the_key(tmp_path):
    from a3jax.demo import load_tasks_config

    p = tmp_path / "tasks.yaml"
    p.write_text("examples: 10\nseed: 0\neval_count: 4\nboth_count: 4\n")
    assert load_tasks_config(str(p), ["examples=20"])["examples"] == 20
    with pytest.raises(ValueError, match="examples"):
        load_tasks_config(str(p), ["examples=-1"])
    with pytest.raises(ValueError, match="exampels"):
        load_tasks_config(str(p), ["exampels=3"])
