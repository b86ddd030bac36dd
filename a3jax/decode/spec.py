"""What a decode call is asked to do: `SamplingParams` (how tokens are drawn) and `DecodeSpec` (which
positions are decoded when, and how a call ends), both frozen and checked when built, plus the
result type and the small checks every decoder shares.

Each field's check lives in its dataclass's `__post_init__` and names the field and the value; the
checks that depend on the model (which decoder its objective runs) are `check_for`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from a3jax.layout import token_range_error
from a3jax.decode import orders as orders_lib
from a3jax.decode.mdlm import MDLM_ORDERS

MODES = ("a3", "reference")
STREAMS = ("query", "content")
BUCKET = 16  # query-row and step counts are rounded up to a multiple of this: fewer distinct compiles


class DecodeError(ValueError):
    """Bad decoding input (shapes, blanks, lengths, options)."""


class DecodeResult(NamedTuple):
    """tokens [B, T] (known tokens unchanged, blanks filled); logprobs [B, T]: log p of each filled
    token under the model (temperature 1, unfiltered; 0 at known/padding); step [B, T]: the step
    that committed each position (-1 for known/padding/unfilled); num_steps: steps run.
    Speculative decoding: steps are model passes, and accepted [B] counts each row's accepted drafts
    (the corrected tokens not included); None otherwise. With stop_at_eos: eos_at [B] is the position
    of the EOS that ended each row (-1 = none); the row's blanks after it are padding (pad token, step
    -1, log-prob 0). None otherwise. generate: new [B, max_new_tokens], the continuation of each
    prompt (pad after an EOS, and at positions left unfilled); None for infill."""
    tokens: np.ndarray
    logprobs: np.ndarray
    step: np.ndarray
    num_steps: int
    accepted: Optional[np.ndarray] = None
    eos_at: Optional[np.ndarray] = None
    new: Optional[np.ndarray] = None


def bucket_up(n: int) -> int:
    """n rounded up to a multiple of BUCKET (at least BUCKET)."""
    return max(-(-int(n) // BUCKET) * BUCKET, BUCKET)


def check_tokens(cfg, tokens: np.ndarray) -> None:
    """Every id in [0, vocab_size)."""
    err = token_range_error(tokens, cfg.vocab_size)
    if err:
        raise DecodeError(err)


def stop_token(cfg, spec: "DecodeSpec") -> int:
    """The token that ends a row: spec.eos_id, else the model's EOS (-1 = none)."""
    return cfg.eos_token_id if spec.eos_id is None else int(spec.eos_id)


def pad_token(cfg) -> int:
    """The id written at padding and after a stopping EOS: the model's pad token, else 0."""
    return cfg.pad_token_id if cfg.pad_token_id >= 0 else 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _positive(cls: str, name: str, value, *, none_ok: bool = False, zero_ok: bool = False, what: str = "") -> None:
    if value is None and none_ok:
        return
    if not _is_int(value) or value < (0 if zero_ok else 1):
        allowed = "a positive int" + (" or 0" if zero_ok else "") + (" or None" if none_ok else "")
        raise DecodeError(f"{cls}.{name} must be {allowed}{what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k (0 = off) and top_p (1 = off) filter sampling. seed: an int
    (every row draws with the key of that seed, so a row's output does not depend on its batch) or a
    sequence of ints, one per row (row r equals that row decoded alone with seed[r]). num_samples=n:
    n independent samples of every row in one batch (rows r*n .. r*n+n-1 are row r's samples;
    sample i draws with fold_in(PRNGKey(seed of row r), i)). independent_rows: row r draws with the
    key of sample r of `seed`, so equal rows give independent samples."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: object = 0
    num_samples: int = 1
    independent_rows: bool = False

    def __post_init__(self):
        c = "SamplingParams"
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) or not t >= 0:
            raise DecodeError(f"{c}.temperature must be a number >= 0 (0 = greedy), got {t!r}")
        _positive(c, "top_k", self.top_k, zero_ok=True, what=" (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 < p <= 1.0:
            raise DecodeError(f"{c}.top_p must be in (0, 1], got {p!r}")
        seed = self.seed
        if not _is_int(seed):
            arr = np.asarray(seed) if not isinstance(seed, (bool, str)) else np.asarray(0.5)
            if arr.dtype.kind not in "iu" or arr.ndim != 1:
                raise DecodeError(f"{c}.seed must be an int or a sequence of ints (one per row), got {seed!r}")
            object.__setattr__(self, "seed", tuple(int(s) for s in arr))  # hashable, immutable
            if self.independent_rows:
                raise DecodeError(f"{c}.independent_rows gives row r the key of sample r of one seed; with one "
                                  f"seed per row ({c}.seed={self.seed!r}) the rows are already independent")
        _positive(c, "num_samples", self.num_samples)
        if self.num_samples > 1 and self.independent_rows:
            raise DecodeError(f"{c}.num_samples={self.num_samples} already draws each sample with its own key; "
                              f"{c}.independent_rows does not apply")
        if not isinstance(self.independent_rows, (bool, np.bool_)):
            raise DecodeError(f"{c}.independent_rows must be a bool, got {self.independent_rows!r}")

    @property
    def per_row_seeds(self) -> bool:
        return isinstance(self.seed, tuple)


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeSpec:
    """How a call decodes (docs/decode.md).

    order: 'left_to_right' | 'random' | 'confidence' | 'entropy' | 'margin' | 'random_dynamic', or an
        int array [T] / [B, T] of group ids for the blanks (a user-given grouping).
    group_size: blanks committed per step (None: 1 for generate, 4 for infill).
    threshold: dynamic orders only; commit every blank with max prob >= threshold (at least one).
    window=W (dynamic orders): semi-autoregressive decoding; each step chooses only among the first W
        remaining blanks in position order (and runs only their W query rows).
    speculative=k (fixed orders): self-speculative sampling with draft blocks of k, exactly the
        token-by-token distribution of the order; group_size is not used; steps count model passes.
    prompt_group_size: the layout of the known tokens: 0 = all in one group, n = left-to-right chunks of
        n; None = the layout the model was trained on (model.prompt_group_size).
    stop_at_eos: end a row at its first EOS once every blank before it is filled (None: generate yes,
        infill no); eos_id: the stop token (None = the model's eos_token_id).
    stream: 'query' (A3 decoding) | 'content' (the content stream left to right: a plain causal LM);
        None = the model's own (content for an ar model, query otherwise).
    mode: 'a3' | 'reference' (dynamic orders: the reference code's dynamic resampling, every committed
        token in one group 0 and the blanks in group 1, recomputed each step).
    use_cache False recomputes the full forward each step (the baseline; same tokens).
    phases: dynamic orders run in up to this many compiled phases whose query rows shrink with the
        remaining blanks (default 8; 1 = one static shape). Same tokens.
    steps: an mdlm model's denoiser calls (default ceil(blanks / group_size)).
    max_steps: run only the first max_steps steps (benchmarks).
    teacher_forcing: commit the given tokens at the blanks instead of drawing (the model's conditional
        log-probs of a known completion)."""
    order: object = "left_to_right"
    group_size: Optional[int] = None
    threshold: Optional[float] = None
    window: Optional[int] = None
    speculative: int = 0
    prompt_group_size: Optional[int] = None
    stop_at_eos: Optional[bool] = None
    eos_id: Optional[int] = None
    stream: Optional[str] = None
    mode: str = "a3"
    use_cache: bool = True
    phases: Optional[int] = None
    steps: Optional[int] = None
    max_steps: Optional[int] = None
    teacher_forcing: bool = False

    def __post_init__(self):
        c = "DecodeSpec"
        try:
            kind, name, _ = orders_lib.resolve_order(self.order)
        except orders_lib.OrderError as e:
            raise DecodeError(f"{c}.order: {e}") from None
        _positive(c, "group_size", self.group_size, none_ok=True)
        _positive(c, "window", self.window, none_ok=True, what=" (blanks a dynamic order may choose from)")
        _positive(c, "speculative", self.speculative, zero_ok=True, what=" (the draft block size k; 0 = off)")
        _positive(c, "prompt_group_size", self.prompt_group_size, none_ok=True, zero_ok=True,
                  what=" (0 = the whole context in one group)")
        _positive(c, "phases", self.phases, none_ok=True, what=" (1 = one static shape)")
        _positive(c, "steps", self.steps, none_ok=True)
        _positive(c, "max_steps", self.max_steps, none_ok=True)
        if self.eos_id is not None and not _is_int(self.eos_id):
            raise DecodeError(f"{c}.eos_id must be an int or None, got {self.eos_id!r}")
        for flag in ("use_cache", "teacher_forcing") + (("stop_at_eos",) if self.stop_at_eos is not None else ()):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise DecodeError(f"{c}.{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.stream is not None and self.stream not in STREAMS:
            raise DecodeError(f"{c}.stream must be one of {STREAMS} or None, got {self.stream!r}")
        if self.mode not in MODES:
            raise DecodeError(f"{c}.mode must be one of {MODES}, got {self.mode!r}")
        if self.threshold is not None:
            th = self.threshold
            if isinstance(th, bool) or not isinstance(th, (int, float, np.floating)) or not 0.0 < th <= 1.0:
                raise DecodeError(f"{c}.threshold must be a probability in (0, 1], got {th!r}")
            if kind != "dynamic":
                raise DecodeError(f"{c}.threshold={th!r} applies to the dynamic orders {orders_lib.DYNAMIC_ORDERS}, "
                                  f"not to order={name!r}")
        if self.window is not None:
            if kind != "dynamic":
                raise DecodeError(f"{c}.window={self.window} applies to the dynamic orders "
                                  f"{orders_lib.DYNAMIC_ORDERS}, not to "
                                  f"order={name!r} (a fixed order already says which blanks come next)")
            if self.threshold is None and (self.group_size or 1) > self.window:
                raise DecodeError(f"{c}.group_size={self.group_size} commits more blanks per step than "
                                  f"window={self.window} offers")
        if self.mode == "reference" and kind != "dynamic":
            raise DecodeError(f"{c}.mode='reference' reproduces the reference's generate_dynamic_resampling, "
                              f"which chooses the blanks dynamically; give a dynamic order ("
                              f"{', '.join(orders_lib.DYNAMIC_ORDERS)}), or use mode='a3' for a fixed order or "
                              f"grouping (it reproduces the reference's generate_two_stream)")
        if self.speculative:
            if kind == "dynamic":
                raise DecodeError(f"{c}.speculative={self.speculative} needs a fixed order (left_to_right, random "
                                  f"or a user grouping), not the dynamic order {name!r}")
            if self.teacher_forcing:
                raise DecodeError(f"{c}.teacher_forcing=True commits given tokens; it has no speculative form")
            if self.group_size not in (None, 1):
                raise DecodeError(f"{c}.speculative={self.speculative} samples token by token (the draft block "
                                  f"is k); group_size={self.group_size} does not apply")

    @property
    def order_kind(self) -> str:
        """'fixed' | 'dynamic' | 'user'."""
        return orders_lib.resolve_order(self.order)[0]


def check_for(decoder: str, spec: DecodeSpec, sampling: SamplingParams) -> None:
    """The options the chosen decoder ('a3' | 'content' | 'mdlm') cannot honour."""
    given = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    if decoder == "content":
        off = dict(order="left_to_right", group_size=(None, 1), threshold=None, window=None, speculative=0,
                   prompt_group_size=None, mode="a3", phases=None, steps=None, teacher_forcing=False)
        bad = [f"DecodeSpec.{k}={given[k]!r}" for k, v in off.items()
               if not (isinstance(given[k], str) or given[k] is None or np.isscalar(given[k]))
               or given[k] not in (v if isinstance(v, tuple) else (v,))]
        bad += [f"SamplingParams.{k}={getattr(sampling, k)!r}" for k, v in
                (("num_samples", 1), ("independent_rows", False)) if getattr(sampling, k) != v]
        if sampling.per_row_seeds:
            bad.append(f"SamplingParams.seed={sampling.seed!r} (per-row seeds)")
        if bad:
            raise DecodeError(f"the content stream decodes left to right one token per step, every row with one "
                              f"key; {', '.join(bad)} does not apply")
    elif decoder == "mdlm":
        if not isinstance(spec.order, str) or orders_lib.ALIASES.get(spec.order, spec.order) not in MDLM_ORDERS:
            raise DecodeError(f"an mdlm model unmasks in order {MDLM_ORDERS}, got DecodeSpec.order={spec.order!r}")
        a3_only = dict(mode="a3", threshold=None, prompt_group_size=None, teacher_forcing=False, speculative=0,
                       window=None)
        for k, off in a3_only.items():
            if given[k] != off:
                raise DecodeError(f"DecodeSpec.{k}={given[k]!r} applies to A3 decoding, not to an mdlm model "
                                  f"(model.objective=mdlm)")
        if sampling.num_samples != 1 or sampling.independent_rows or sampling.per_row_seeds:
            raise DecodeError("SamplingParams.num_samples, independent_rows and per-row seeds apply to A3 decoding, "
                              "not to an mdlm model (model.objective=mdlm)")
    elif spec.steps is not None:
        raise DecodeError(f"DecodeSpec.steps={spec.steps} sets an mdlm model's denoiser calls; A3 decoding takes "
                          f"group_size / order")

