"""Mesh creation and logical-axis shardings for params, batches and caches.

Logical axis names live on the params (a3jax.model.PARAM_AXES) and on activations; the mapping to the
mesh axes (data, fsdp, tensor) is `MeshConfig.rules`. A logical axis whose mesh axes do not divide the
dimension is replicated instead (e.g. 2 kv heads on a tensor axis of 4), so any config runs on any mesh.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax.config import ConfigError, MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")


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
    # Auto axes: linen init and GSPMD propagation do not work on Explicit axes (JAX-NOTES.md).
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU topologies: plain reshape is as good
        arr = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rules_of(mesh_cfg: MeshConfig) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in mesh_cfg.rules)


@contextlib.contextmanager
def activate(mesh, rules):
    """Mesh + logical rules active for tracing (activation constraints resolve against them)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names, shape, mesh, rules) -> P:
    """PartitionSpec for logical `names`; axes that do not divide the dim (or repeat) are dropped."""
    table = dict(rules)
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if isinstance(axes, str):
            axes = (axes,)
        if axes:
            axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        if not axes or dim % _axis_size(mesh, axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh, rules):
    """NamedShardings for a pytree given its logical-axes tree and shapes tree (same structure)."""
    is_leaf = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda names, shp: NamedSharding(mesh, logical_to_spec(names, shp, mesh, rules)),
                        axes_tree, shapes_tree, is_leaf=is_leaf)


def param_shardings(cfg: ModelConfig, mesh, rules):
    from a3jax.model import param_axes, param_shapes

    return tree_shardings(param_axes(cfg), param_shapes(cfg), mesh, rules)


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, T, ...]: batch over the data axes, the rest replicated."""
    names = ("batch",) + (None,) * (ndim - 1)
    spec = dict(rules).get("batch")
    spec = (spec,) if isinstance(spec, str) else tuple(spec or ())
    spec = tuple(a for a in spec if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, P(spec if spec else None, *([None] * (ndim - 1))))


def shard_params(params, cfg: ModelConfig, mesh, rules):
    """Places a host params tree onto the mesh."""
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def init_params_sharded(cfg: ModelConfig, rng, mesh, rules):
    """Random init directly into the target shardings (no full host copy; works at 8B scale)."""
    from a3jax.model import init_params

    shardings = param_shardings(cfg, mesh, rules)
    with activate(mesh, rules):
        return jax.jit(lambda r: init_params(cfg, r), out_shardings=shardings)(rng)
