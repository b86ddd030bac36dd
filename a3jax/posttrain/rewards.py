"""Rewards: Python callables named in the config, `fn(completion: str, example: dict, **args) -> float`.

Built-ins (by name):
    exact_match   1.0 if the extracted answer equals str(example[field]) (default field 'answer'), else 0.0.
                  The answer is the first group of `pattern` searched in the completion (default: the
                  completion's first line), both stripped.
    regex         1.0 if re.search(pattern, completion) matches, else 0.0.
    unit_tests    1.0 if `python -c completion + example[field]` (default field 'tests') exits 0 within
                  timeout seconds in a fresh subprocess (isolated mode, throwaway working directory), else 0.0.
Any other name is 'package.module:function' (imported when the config is loaded).

A reward that raises or returns a non-finite value stops the run with RewardError naming the reward and
the example: a silent 0 would teach the policy from a bug.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
import subprocess
import sys
import tempfile
from typing import Callable


class RewardError(ValueError):
    """An unknown reward, or a reward that raised or returned a non-finite value."""


def exact_match(completion: str, example: dict, field: str = "answer", pattern: str = "") -> float:
    if field not in example:
        raise KeyError(f"the example has no field {field!r} (exact_match compares with it)")
    if pattern:
        m = re.search(pattern, completion)
        got = (m.group(1) if m and m.groups() else m.group(0) if m else None)
    else:
        got = completion.split("\n", 1)[0]
    return float(got is not None and got.strip() == str(example[field]).strip())


def regex(completion: str, example: dict, pattern: str = "") -> float:
    if not pattern:
        raise ValueError("the regex reward needs args.pattern")
    return float(re.search(pattern, completion) is not None)


def unit_tests(completion: str, example: dict, field: str = "tests", timeout: float = 5.0) -> float:
    if field not in example:
        raise KeyError(f"the example has no field {field!r} (unit_tests runs it after the completion)")
    program = completion + "\n" + str(example[field]) + "\n"
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-I", "-c", program], cwd=d, capture_output=True,
                               timeout=float(timeout), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(r.returncode == 0)


BUILTIN = {"exact_match": exact_match, "regex": regex, "unit_tests": unit_tests}


def resolve(name: str) -> Callable:
    """The callable of a built-in name or 'package.module:function'."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise RewardError(f"unknown reward {name!r}: the built-ins are {', '.join(BUILTIN)}, or give "
                          f"'package.module:function'")
    mod, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not callable")
    return fn


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable
    weight: float
    args: dict


def build(specs) -> list:
    """[(name, weight, args dict)] -> [Reward], each name resolved now (a bad name fails before any work)."""
    return [Reward(n, resolve(n), float(w), dict(a)) for n, w, a in specs]


def score(rewards: list, completion: str, example: dict, index: int) -> float:
    """The weighted sum of the rewards of one completion; RewardError if one raises or is not finite."""
    total = 0.0
    for r in rewards:
        try:
            v = float(r.fn(completion, example, **r.args))
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its name
            raise RewardError(f"reward {r.name!r} raised on example {index} ({type(e).__name__}: {e})") from e
        if not math.isfinite(v):
            raise RewardError(f"reward {r.name!r} returned {v} on example {index}; rewards must be finite")
        total += r.weight * v
    return total
