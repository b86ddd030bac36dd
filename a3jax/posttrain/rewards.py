"""Rewards: Python callables named in the config, `fn(completion: str, example: dict, **args) -> float`.

Built-ins (by name):
    exact_match   1.0 if the extracted answer equals str(example[field]) (default field 'answer'), else 0.0.
                  The answer is the first group of `pattern` searched in the completion (default: the
                  completion's first line), both stripped.
    regex         1.0 if re.search(pattern, completion) matches, else 0.0.
    unit_tests    1.0 if the program `completion + example[field]` (default field 'tests') runs to its end
                  and exits 0 in the sandbox (a3jax.sandbox: its own `python -I`, resource limits,
                  namespaces where the platform allows), else 0.0. Its other args are the sandbox's
                  Limits (timeout_s, cpu_s, memory_mb, nproc, fsize_mb) and `mode` (auto | uid |
                  namespaces | guard; `isolation` reports the mode in effect).
Any other name is 'package.module:function' (imported when the config is loaded).

A reward that raises or returns a non-finite value stops the run with RewardError naming the reward and
the example: a silent 0 would teach the policy from a bug.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
from typing import Callable, Optional

from a3jax.sandbox import Limits, Sandbox


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


@functools.lru_cache(maxsize=8)
def unit_tests_sandbox(timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 2048, nproc: int = 64,
                       fsize_mb: int = 16, mode: str = "auto") -> Sandbox:
    """The unit_tests reward's sandbox for its args (one per setting: the platform is probed once)."""
    return Sandbox(Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, nproc=nproc, fsize_mb=fsize_mb),
                   workers=1, mode=mode)


def unit_tests(completion: str, example: dict, field: str = "tests", **limits) -> float:
    if field not in example:
        raise KeyError(f"the example has no field {field!r} (unit_tests runs it after the completion)")
    program = completion + "\n" + str(example[field]) + "\n"
    return float(unit_tests_sandbox(**limits).run(program).passed)


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
    """[(name, weight, args dict)] -> [Reward], each name resolved now and the sandbox of unit_tests set up
    (a bad name or sandbox setting fails before any work)."""
    out = [Reward(n, resolve(n), float(w), dict(a)) for n, w, a in specs]
    for r in out:
        if r.fn is unit_tests:
            try:
                unit_tests_sandbox(**_limits(r.args))
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward {r.name!r}: bad sandbox args {r.args} ({e})") from None
    return out


def isolation(reward: Reward) -> Optional[dict]:
    """How a reward runs untrusted code (the sandbox's mode and limits), or None when it runs none."""
    if reward.fn is not unit_tests:
        return None
    return unit_tests_sandbox(**_limits(reward.args)).isolation


def _limits(args: dict) -> dict:
    return {k: v for k, v in args.items() if k != "field"}


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
