"""Things the training loop does between steps, each saying how often (Levanter's `add_hook(fn, every=N)`).

    hooks = Hooks(total_steps)
    hooks.add(log, every=10)                 # after steps 10, 20, ... and after the last step
    hooks.add(export, every=0)               # only after the last step (train.steps)
    for hook in hooks.due(step): hook.fn(info)

The trainer registers its own (log, eval, checkpoint, final export, in that order) and appends the
hooks `train(cfg, hooks=...)` is given, so a caller adds behaviour (a progress callback, a pause, a
probe) without touching the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple


class StepInfo(NamedTuple):
    """What a hook sees: the optimizer steps done, the train state after them (params, opt_state,
    step, rng) and the curriculum stage of the last step."""

    step: int
    state: Any
    stage: int


@dataclasses.dataclass(frozen=True)
class Hook:
    """fn(StepInfo) after every step that is a multiple of `every` (every <= 0: never periodically),
    and after the run's last step (train.steps) when `at_end`."""

    fn: Callable[[StepInfo], Any]
    every: int = 1
    at_end: bool = True
    name: str = ""

    def due(self, step: int, total: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == total)


class Hooks:
    """The ordered hooks of one run; `due(step)` lists the ones to run after `step`, in order."""

    def __init__(self, total_steps: int, hooks=()):
        self.total = int(total_steps)
        self.hooks: list[Hook] = list(hooks)

    def add(self, fn: Callable[[StepInfo], Any], every: int = 1, at_end: bool = True, name: str = "") -> Hook:
        hook = Hook(fn, int(every), at_end, name or getattr(fn, "__name__", "hook"))
        self.hooks.append(hook)
        return hook

    def due(self, step: int) -> list[Hook]:
        return [h for h in self.hooks if h.due(step, self.total)]
