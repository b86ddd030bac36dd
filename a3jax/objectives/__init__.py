"""The training objectives as one table: each entry says everything the rest of the code needs.

    obj = objectives.get("mdlm")            # or objectives.of(cfg) for a Config / ModelConfig
    noise = obj.draw_noise(key, layout, mask_id)  # None unless the objective transforms its inputs
    sums = obj.sums(cfg.model, params, layout, noise, z_loss)
    obj.stream, obj.decoder, obj.exact_likelihood, obj.can_infill, obj.forward_flops(cfg.model, seq_len)

Entries (docs/train.md):
    a3    the query stream at i predicts tokens[i] under the curriculum's groupings; scores any
          grouping exactly; decoded by the A3 decoders (any order, infilling).
    ar    the content stream with groups = positions (a plain causal LLaMA) predicts tokens[i+1];
          scores left to right; decoded causally from the content stream.
    mdlm  masked diffusion on the content stream with every position of a document in one group
          (bidirectional): the NELBO sum_masked CE / t (a3jax.model.diffusion); scored by its NELBO.

Code elsewhere asks an entry (`obj.stream == "content"`, `obj.can_infill`, ...) and never compares
objective names, so a new objective is one new `Objective` passed to `register` plus its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional


from a3jax.layout import Layout
from a3jax.objectives import losses as loss_lib


class ObjectiveError(ValueError):
    """An unknown objective, or params trained for one objective handed to code that needs another."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective. Frozen: every attribute is read-only.

    stream: the stream its loss trains and decoding reads by default ('query' | 'content').
    streams: the streams its forward pass runs (a3 runs the content stream for the query stream's keys).
    decoder: the decoder family generate/infill use ('a3' | 'content' | 'mdlm').
    scorer: how a3jax.score scores its params: 'query' (exact, any grouping), 'content' (exact, left
        to right only) or 'nelbo' (a Monte-Carlo upper bound on -log P).
    can_infill: whether its decoders fill blanks (any-order conditioning).
    position_order: trains on rows in position order (its data stages must use the 'ar' grouping).
    needs_mask_token: its inputs substitute model.mask_token_id.
    predicts_next: the logits at i predict tokens[i+1] (targets counted on the content stream's shift).
    sums: (cfg_model, params, layout, noise, z_loss) -> dict(nll, z, correct, tokens) of one batch.
    noise: (key, layout, mask_id) -> pytree drawn once per global batch, or None (no input transform).
    forward_flops: (cfg_model, seq_len) -> forward FLOPs per token of what `sums` really computes.
    eval_label: name of its held-out loss when position_order (else one loss per eval grouping).
    """

    name: str
    stream: str
    streams: tuple
    decoder: str
    scorer: str
    can_infill: bool
    position_order: bool
    needs_mask_token: bool
    predicts_next: bool
    sums: Callable
    forward_flops: Callable
    noise: Optional[Callable] = None
    eval_label: str = ""

    @property
    def exact_likelihood(self) -> bool:
        return self.scorer != "nelbo"

    def draw_noise(self, key, layout: Layout, mask_id: int):
        """The input transform of one global batch (None when the objective has none)."""
        return None if self.noise is None else self.noise(key, layout, mask_id)

    def target_count(self, layout: Layout):
        """Number of targets of a batch (the loss normaliser), matching `sums`' tokens."""
        return loss_lib.target_count(layout, "content" if self.predicts_next else "query")

    def train_flops(self, cfg_model, seq_len: int) -> float:
        """Training FLOPs per token: forward + backward (2x forward)."""
        return 3.0 * self.forward_flops(cfg_model, seq_len)

    def eval_sets(self, strategies) -> list:
        """(label, grouping strategy) of each held-out loss: one per data.eval_strategies entry, or one
        `eval_label` loss on position-ordered rows."""
        if self.position_order:
            return [(self.eval_label, "ar")]
        return [(s, s) for s in strategies]


# ----------------------------------------------------------------------------- FLOPs per token


def _sizes(m):
    """Per-layer matmul parameter counts and per-key attention FLOPs of one token."""
    E, H, K, D, M = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_size, m.intermediate_size
    return dict(qo=2 * E * H * D, kv=2 * E * K * D, mlp=3 * E * M, attn_per_key=4 * H * D, head=2 * E * m.vocab_size)


def _causal_flops(m, seq_len: int) -> float:
    """One causal stream: matmuls 2 FLOPs per param; attention over seq_len/2 keys on average."""
    s = _sizes(m)
    return m.num_layers * (2 * (s["qo"] + s["kv"] + s["mlp"]) + s["attn_per_key"] * seq_len / 2) + s["head"]


def _bidirectional_flops(m, seq_len: int) -> float:
    """One stream attending to the whole row (mdlm's denoiser: every position in one group)."""
    s = _sizes(m)
    return m.num_layers * (2 * (s["qo"] + s["kv"] + s["mlp"]) + s["attn_per_key"] * seq_len) + s["head"]


def _two_stream_flops(m, seq_len: int) -> float:
    """A3: the content stream (all layers but the last: the last layer's content output feeds nothing)
    plus the query stream (every layer; it reads the content stream's keys/values, computed once)."""
    s = _sizes(m)
    rest = 2 * (s["qo"] + s["mlp"]) + s["attn_per_key"] * seq_len / 2
    return m.num_layers * 2 * s["kv"] + (m.num_layers - 1) * rest + m.num_layers * rest + s["head"]


# ----------------------------------------------------------------------------- losses


def _a3_sums(cfg_model, params, layout, noise, z_loss):
    return loss_lib.loss_sums(cfg_model, params, layout, z_loss, "query")


def _ar_sums(cfg_model, params, layout, noise, z_loss):
    # groups = positions: the content stream is exactly LLaMA whatever grouping the rows carry
    return loss_lib.loss_sums(cfg_model, params, layout._replace(groups=layout.positions), z_loss, "content")


_TABLE: dict = {}


def register(obj: Objective) -> Objective:
    """Adds an entry (a new objective); its name must be new."""
    if obj.name in _TABLE:
        raise ObjectiveError(f"objective {obj.name!r} is already registered")
    _TABLE[obj.name] = obj
    return obj


def unregister(name: str) -> None:
    """Removes an entry added by `register` (tests register toy objectives and take them out again)."""
    get(name)
    del _TABLE[name]


def names() -> tuple:
    """The valid objective names, in registration order (train.objective / model.objective)."""
    return tuple(_TABLE)


def get(name: str) -> Objective:
    """The entry of objective `name`; ObjectiveError naming it and the valid ones if unknown."""
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ObjectiveError(f"unknown objective {name!r}; the objectives are {', '.join(names())}") from None


def of(cfg) -> Objective:
    """The entry of a Config (train.objective) or a ModelConfig (model.objective: the checkpoint's)."""
    return get(cfg.train.objective if hasattr(cfg, "train") else cfg.objective)


def require(cfg, what: str, **needs) -> Objective:
    """The entry of cfg (a ModelConfig: the params' objective) if it has every attribute value in
    `needs` (e.g. can_infill=True); else ObjectiveError saying what `what` needs and which objectives
    have it. Also checks that an objective that needs a MASK token has one."""
    obj = of(cfg)
    missing = {k: v for k, v in needs.items() if getattr(obj, k) != v}
    if missing:
        fit = [o.name for o in _TABLE.values() if all(getattr(o, k) == v for k, v in needs.items())]
        raise ObjectiveError(
            f"{what} does not apply to these params: their checkpoint was trained with train.objective="
            f"{obj.name!r} (model.objective in model.yaml), and {what} needs "
            f"{' or '.join(map(repr, fit)) or 'an objective no entry provides'}")
    if obj.needs_mask_token and cfg.mask_token_id < 0:
        raise ObjectiveError(f"{what}: an {obj.name} model needs model.mask_token_id (model.yaml has -1)")
    return obj


A3 = register(Objective(
    name="a3", stream="query", streams=("content", "query"), decoder="a3", scorer="query", can_infill=True,
    position_order=False, needs_mask_token=False, predicts_next=False, sums=_a3_sums,
    forward_flops=_two_stream_flops))

AR = register(Objective(
    name="ar", stream="content", streams=("content",), decoder="content", scorer="content", can_infill=False,
    position_order=True, needs_mask_token=False, predicts_next=True, sums=_ar_sums, forward_flops=_causal_flops,
    eval_label="ar"))

MDLM = register(Objective(
    name="mdlm", stream="content", streams=("content",), decoder="mdlm", scorer="nelbo", can_infill=True,
    position_order=True, needs_mask_token=True, predicts_next=False, sums=loss_lib.mdlm_sums,
    forward_flops=_bidirectional_flops, noise=loss_lib.mdlm_noise, eval_label="nelbo"))

__all__ = ["Objective", "ObjectiveError", "register", "unregister", "names", "get", "of", "require", "A3", "AR",
           "MDLM"]
