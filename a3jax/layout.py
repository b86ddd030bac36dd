"""The row layout, defined once: the five int32 arrays every example carries from packing to the model.

    tokens       token id at each slot
    positions    original position of the slot's token in its segment (RoPE)
    groups       generation-order group id (smaller = earlier; a3jax.masks reads it)
    segment_ids  document piece of the slot (1, 2, ...; 0 = padding)
    loss_mask    1 where the slot's token is a training target

Each is [B, T] for a batch or [T] for one row. `Layout` is a NamedTuple, so it is a JAX pytree: it
passes through `jit`, `tree.map` and `lax.scan` as it is. The data pipeline, Grain and Orbax carry
dicts of numpy arrays; their layout keys are `LAYOUT_KEYS`, and `Layout.from_batch` turns such a dict
into the typed layout (once, at the train step), ignoring the metadata fields (`stage`, ...).

Defaults (`with_defaults`): positions = groups = arange(T) (left-to-right AR), one segment
(segment_ids = 1), loss_mask = segment_ids != 0.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np


class LayoutKeyError(KeyError):
    """A batch dict lacks a layout key."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class Layout(NamedTuple):
    """tokens, positions, groups, segment_ids, loss_mask: int32 arrays of one shape ([B, T] or [T])."""

    tokens: Any
    positions: Any
    groups: Any
    segment_ids: Any
    loss_mask: Any

    @classmethod
    def from_batch(cls, batch) -> "Layout":
        """The layout fields of a batch dict (other keys are ignored); a Layout is returned as it is.
        Raises LayoutKeyError naming the first missing key."""
        if isinstance(batch, cls):
            return batch
        for k in LAYOUT_KEYS:
            if k not in batch:
                raise LayoutKeyError(f"batch has no {k!r} (layout keys: {', '.join(LAYOUT_KEYS)}; "
                                     f"got: {', '.join(sorted(batch))})")
        return cls(*(batch[k] for k in LAYOUT_KEYS))

    def as_dict(self) -> dict:
        """{key: array} with exactly LAYOUT_KEYS (what the data pipeline and Grain carry)."""
        return dict(zip(LAYOUT_KEYS, self))


LAYOUT_KEYS: tuple[str, ...] = Layout._fields


def token_range_error(tokens, vocab_size: int):
    """The message naming a token id outside [0, vocab_size) (the largest too-large one, else the most
    negative), or None when every id fits: each caller raises its own error type with it."""
    t = np.asarray(tokens)
    if not t.size or (t.min() >= 0 and t.max() < vocab_size):
        return None
    bad = int(t.max()) if t.max() >= vocab_size else int(t.min())
    return f"token id {bad} is outside [0, vocab_size={vocab_size})"


def with_defaults(tokens, positions=None, groups=None, segment_ids=None, loss_mask=None) -> Layout:
    """A Layout of jnp int32 arrays shaped like `tokens` ([B, T] or [T]), the missing fields filled
    with the defaults (module docstring). Works on traced values."""
    shape = np.shape(tokens)
    ar = jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.int32), shape)
    positions = ar if positions is None else jnp.asarray(positions, jnp.int32)
    groups = ar if groups is None else jnp.asarray(groups, jnp.int32)
    segment_ids = jnp.ones(shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    loss_mask = (segment_ids != 0).astype(jnp.int32) if loss_mask is None else jnp.asarray(loss_mask, jnp.int32)
    return Layout(jnp.asarray(tokens, jnp.int32), positions, groups, segment_ids, loss_mask)
