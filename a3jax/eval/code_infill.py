"""Code infilling scored by execution: a model fills each task's middle (a3jax.eval.humaneval) through
the Engine, the program runs in the sandbox, and pass@k is reported with the unbiased estimator of
Chen et al. 2021.

Settings (`FillSettings`):
* length 'given': the blank has as many tokens as the canonical middle (the DiffuLLaMA protocol);
  'budget': a fixed blank of `budget` tokens, the fill cut where the model writes the suffix's first
  line (and at an EOS).
* A3 checkpoints fill with the engine's infill decoder (order, group_size, threshold, speculative);
  mdlm checkpoints with their own iterative unmasking (the engine picks it); a model whose decoder is
  the causal content stream (an `ar` checkpoint, or stream='content': a converted LLaMA before
  adaptation) continues the prefix only, as a plain LM can, for the same number of tokens.
Contexts longer than the model's window keep the end of the prefix and the start of the suffix.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from a3jax.decode import api
from a3jax.decode.engine import Engine
from a3jax.decode.spec import DecodeSpec, SamplingParams
from a3jax.decode.text import MASK_RE
from a3jax.eval.humaneval import InfillTask
from a3jax.sandbox import Sandbox

LENGTHS = ("given", "budget")
_MARGIN = 4  # tokens kept free when a decoded-and-re-encoded context may grow a little


@dataclasses.dataclass(frozen=True)
class FillSettings:
    length: str = "given"
    budget: int = 64
    order: str = "confidence"
    group_size: int = 1
    threshold: Optional[float] = None
    speculative: int = 0
    stream: Optional[str] = None
    temperature: float = 0.0
    samples: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.length not in LENGTHS:
            raise ValueError(f"FillSettings.length must be one of {LENGTHS}, got {self.length!r}")
        for name in ("budget", "samples", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FillSettings.{name} must be a positive int, got {v!r}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"FillSettings.samples={self.samples} with temperature 0 draws the same greedy fill "
                             f"{self.samples} times; set a temperature > 0")

    def spec(self, prefix_only: bool) -> DecodeSpec:
        if prefix_only:
            return DecodeSpec(stream="content" if self.stream == "content" else None)
        return DecodeSpec(order=self.order, group_size=None if self.speculative else self.group_size,
                          threshold=self.threshold, speculative=self.speculative, stream=self.stream,
                          stop_at_eos=False)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, num_samples=self.samples, seed=self.seed)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def cut_at_suffix(fill: str, suffix: str) -> str:
    """The fill up to the line where the model starts writing the suffix's first non-blank line."""
    first = next((ln.strip() for ln in suffix.splitlines() if ln.strip()), None)
    if first is None:
        return fill
    lines = fill.splitlines(keepends=True)
    for i, ln in enumerate(lines):
        if ln.strip() == first and i > 0:
            return "".join(lines[:i])
    return fill


def prefix_only(engine: Engine, settings: FillSettings) -> bool:
    """Whether this model and stream can only continue the prefix (a causal LM)."""
    return settings.stream == "content" or api.model_decoder(engine.cfg) == "content"


class CodeInfiller:
    """Fills tasks' middles with one Engine under one FillSettings."""

    def __init__(self, engine: Engine, settings: FillSettings):
        if engine.tokenizer is None:
            raise ValueError("code infilling needs an Engine with a tokenizer")
        self.engine, self.settings, self.tok = engine, settings, engine.tokenizer
        self.prefix_only = prefix_only(engine, settings)
        self.spec, self.sampling = settings.spec(self.prefix_only), settings.sampling()
        self.window = engine.buckets[-1]

    def blank_length(self, task: InfillTask) -> int:
        if self.settings.length == "budget":
            return self.settings.budget
        return max(1, len(self.tok.encode(task.middle)))

    def fit_context(self, task: InfillTask, n: int):
        """(prefix text, suffix text) cut to fit the window with n blank tokens and a BOS."""
        pre, suf = self.tok.encode(task.prompt), ([] if self.prefix_only else self.tok.encode(task.suffix))
        room = self.window - n - 1 - _MARGIN
        if room < 1:
            raise ValueError(f"task {task.task_id}: a blank of {n} tokens leaves no room in the model's "
                             f"window of {self.window}")
        if len(pre) + len(suf) > room:
            keep_suf = min(len(suf), room // 3)
            suf, pre = suf[:keep_suf], pre[len(pre) - (room - keep_suf):]
            return self.tok.decode(pre), self.tok.decode(suf)
        return task.prompt, ("" if self.prefix_only else task.suffix)

    def fill(self, tasks: Sequence[InfillTask], progress=None) -> List[List[str]]:
        """settings.samples middles per task, in task order."""
        out: List[Optional[List[str]]] = [None] * len(tasks)
        lengths = [self.blank_length(t) for t in tasks]
        # Group by a power-of-two length so that prefix-only generation compiles a few max_new_tokens.
        groups: Dict[int, List[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(1 << max(3, int(np.ceil(np.log2(n)))), []).append(i)
        for cap, idx in sorted(groups.items()):
            for a in range(0, len(idx), self.engine.slots):
                chunk = idx[a:a + self.engine.slots]
                fills = self._fill_chunk([tasks[i] for i in chunk], [lengths[i] for i in chunk], cap)
                for i, f in zip(chunk, fills):
                    out[i] = f
                if progress is not None:
                    progress.update(len(chunk))
        return out

    def _fill_chunk(self, tasks, lengths, cap) -> List[List[str]]:
        s, k = self.settings, self.settings.samples
        if self.prefix_only:
            prompts = [self.fit_context(t, cap)[0] for t in tasks]
            comps = self.engine.generate(prompts, max_new_tokens=cap, spec=self.spec, sampling=self.sampling)
            raw = [[self._decode(c.tokens[:n]) for c in comps[j * k:(j + 1) * k]] for j, n in enumerate(lengths)]
        else:
            texts = []
            for t, n in zip(tasks, lengths):
                pre, suf = self.fit_context(t, n)
                if MASK_RE.search(pre) or MASK_RE.search(suf):
                    raise ValueError(f"task {t.task_id}: its text contains a [MASK:n] marker")
                texts.append(f"{pre}[MASK:{n}]{suf}")
            rows = self.engine.infill(texts, spec=self.spec, sampling=self.sampling)
            raw = []
            for j, (t, n) in enumerate(zip(tasks, lengths)):
                start = len(self.tok.encode(self.fit_context(t, n)[0])) + 1
                raw.append([self._decode(r.tokens[start:start + n]) for r in rows[j * k:(j + 1) * k]])
        if s.length == "budget":
            raw = [[cut_at_suffix(f, t.suffix) for f in fs] for t, fs in zip(tasks, raw)]
        return raw

    def _decode(self, ids) -> str:
        """Text of ids up to the first EOS, pad left out."""
        tok, out = self.tok, []
        for x in map(int, ids):
            if x == tok.eos_id:
                break
            if x != tok.pad_id:
                out.append(x)
        return tok.decode(out)


def score_fills(tasks: Sequence[InfillTask], fills: Sequence[Sequence[str]], sandbox: Sandbox,
                ks: Sequence[int] = (1,), progress: bool = False) -> dict:
    """Runs every fill (the same number of samples per task) and returns {n_tasks, samples, pass@k...,
    seconds_exec, tasks: [{task_id, passed (of samples), fill (the first)}]}."""
    n = len(fills[0]) if fills else 1
    if any(len(f) != n for f in fills) or len(fills) != len(tasks):
        raise ValueError("score_fills needs one list of fills per task, all of the same length")
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs at least {k} samples per task; got {n}")
    t0 = time.perf_counter()
    programs = [t.program(f) for t, fs in zip(tasks, fills) for f in fs]
    outs = sandbox.run_many(programs, progress=progress, desc="run")
    passed = [sum(o.passed for o in outs[i * n:(i + 1) * n]) for i in range(len(tasks))]
    res = dict(n_tasks=len(tasks), samples=n)
    for k in ks:
        res[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in passed])) if tasks else 0.0
    res.update(seconds_exec=round(time.perf_counter() - t0, 3),
               tasks=[dict(task_id=t.task_id, passed=c, fill=fs[0]) for t, c, fs in zip(tasks, passed, fills)])
    return res


def evaluate(engine: Engine, tasks: Sequence[InfillTask], settings: FillSettings, sandbox: Sandbox,
             ks: Sequence[int] = (1,), progress: bool = False) -> dict:
    """Fills every task with the model, then score_fills; adds seconds_fill."""
    for k in ks:
        if not 1 <= k <= settings.samples:
            raise ValueError(f"pass@{k} needs at least {k} samples per task; got samples={settings.samples}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="fill", file=sys.stderr)
    t0 = time.perf_counter()
    fills = CodeInfiller(engine, settings).fill(tasks, progress=bar)
    if bar is not None:
        bar.close()
    seconds = round(time.perf_counter() - t0, 3)
    return dict(score_fills(tasks, fills, sandbox, ks, progress), seconds_fill=seconds)
