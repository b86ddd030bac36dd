"""Mesh creation and logical-axis shardings for params, activations, batches and the KV cache.

Logical axis names live on the params (a3jax.model's parameter axes), on activations (the model's
`constrain` calls) and on the KV cache (`CACHE_AXES`); the mapping to the mesh axes (data, fsdp,
tensor) is `MeshConfig.rules`. Every name goes through one resolver, `logical_to_spec`: a logical axis
whose mesh axes do not divide the dimension is replicated instead (e.g. 2 kv heads on a tensor axis of
4), so any config runs on any mesh. Batches use the same rule table (`batch_sharding`).

This module knows nothing of the model: it takes names, shapes and trees of them, so the model can
import it (for `constrain`) at its top.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from a3jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of the KV cache (a3jax.model.KVCache) by field: keys/values [layers, batch, cache
# length, kv heads, head dim] and the slots' group and segment ids [batch, cache length].
KV_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
CACHE_AXES = {"k": KV_AXES, "v": KV_AXES, "groups": ("batch", "cache_length"),
              "segments": ("batch", "cache_length")}

# (mesh, rules) while `activate` is in effect; read by `constrain` when a function is traced.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("a3jax_sharding_active", default=None)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 entries; raises ConfigError naming the axes when the product does not fit."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{name}: must be positive or -1, got {s}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if fills:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices cannot be split with "
                              f"{dict(zip(MESH_AXES, sizes))} (fixed axes multiply to {known})")
        sizes[fills[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))} "
                          f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: linen's param init and GSPMD's sharding propagation do not work on Explicit axes.
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies: plain reshape is as good
        arr = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def abstract_mesh(mesh_cfg: MeshConfig, num_devices: int, device_kind: str, platform: str = "gpu"):
    """The mesh `make_mesh` would build over `num_devices` devices of `device_kind` that this host does
    not have (lowering for them): axis sizes, names and types only."""
    shape = mesh_shape(mesh_cfg, num_devices)
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                                     abstract_device=device)


def rules_of(mesh_cfg: MeshConfig) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in mesh_cfg.rules)


@contextlib.contextmanager
def activate(mesh, rules):
    """Mesh + logical rules active for tracing: `constrain` (activations, the KV cache) resolves
    against them; outside it `constrain` does nothing."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    # An AbstractMesh (devices described, not present: lowering for another platform) has no devices
    # to set; it is entered as the abstract mesh instead.
    ctx = jax.set_mesh(mesh) if isinstance(mesh, Mesh) else jax.sharding.use_abstract_mesh(mesh)
    try:
        with ctx:
            yield
    finally:
        _ACTIVE.reset(token)


def active():
    """(mesh, rules) of the enclosing `activate`, or None (kernels that run per shard read it)."""
    return _ACTIVE.get()


def _rule_axes(rules, name, mesh) -> tuple:
    """Mesh axes the rules give logical `name`, leaving out axes of size 1 (or not in the mesh)."""
    axes = dict(rules).get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _axis_size(mesh, axes) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names, shape, mesh, rules) -> P:
    """PartitionSpec for logical `names`; axes that do not divide the dim (or repeat) are dropped."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in _rule_axes(rules, name, mesh) if a not in used)
        if not axes or dim % _axis_size(mesh, axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x, names):
    """Sharding constraint on an activation from its logical axis `names` (one per dim), resolved by
    `logical_to_spec` against the mesh and rules of the enclosing `activate`; a no-op without one or
    on a one-device mesh."""
    active = _ACTIVE.get()
    if active is None or active[0].size == 1:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def tree_shardings(axes_tree, shapes_tree, mesh, rules):
    """NamedShardings for a pytree given its logical-axes tree and shapes tree (same structure)."""
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda names, shp: NamedSharding(mesh, logical_to_spec(names, shp, mesh, rules)),
                        axes_tree, shapes_tree, is_leaf=is_leaf)


def cache_shardings(kv_shape, mesh, rules) -> dict:
    """NamedShardings of the KV cache fields (k, v, groups, segments; see CACHE_AXES) for keys/values
    of shape kv_shape [layers, batch, length, kv_heads, head_dim]: `KVCache(**cache_shardings(...))`."""
    shapes = {"k": tuple(kv_shape), "v": tuple(kv_shape), "groups": tuple(kv_shape[1:3]),
              "segments": tuple(kv_shape[1:3])}
    return {f: NamedSharding(mesh, logical_to_spec(CACHE_AXES[f], shapes[f], mesh, rules)) for f in CACHE_AXES}


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, T, ...]: the batch dim over the mesh axes of the `batch` rule, the rest
    replicated. Unlike `logical_to_spec` nothing is dropped: a global batch the data axes do not
    divide is an error, not a silently replicated batch."""
    axes = _rule_axes(rules, "batch", mesh)
    return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))
