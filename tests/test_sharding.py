"""a3jax.sharding as the one source of placement: the global batch takes the step's sharding from the
`batch` rule, activations resolve their logical names like params do (`constrain`), the KV cache is
laid out as `CACHE_AXES` defines wherever it is built, and `auto` picks kernels by one policy."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from a3jax import sharding as sh
from a3jax.config import MeshConfig, ModelConfig
from a3jax.data import to_global_batch
from a3jax.decode.cache import empty_cache, prefill
from a3jax.model import KVCache, init_params, shard_params
from a3jax.model.attention import choose_kernel
from a3jax.layout import LAYOUT_KEYS

MESH_2X2X2 = MeshConfig(data=2, fsdp=2, tensor=2)


def _rules(**overrides):
    return tuple({**dict(sh.rules_of(MeshConfig())), **overrides}.items())


def _host_batch(rows=8, length=16):
    rng = np.random.default_rng(0)
    out = {k: rng.integers(0, 50, (rows, length)).astype(np.int32) for k in LAYOUT_KEYS}
    out["stage"] = np.zeros(rows, np.int32)  # per-example metadata [B] rides along
    return out


# ----------------------------------------------------------------------------- the global batch


@pytest.mark.parametrize("batch_rule, rows_per_device", [
    (("data", "fsdp"), 2),  # the default: 8 rows over data*fsdp = 4
    (("data",), 4),         # a batch rule over the data axis only
    ("fsdp", 4),            # ... or over fsdp only
])
def test_global_batch_has_the_steps_sharding_under_any_batch_rule(batch_rule, rows_per_device):
    assert jax.device_count() == 8
    mesh = sh.make_mesh(MESH_2X2X2)
    rules = _rules(batch=batch_rule)
    step_sharding = sh.batch_sharding(mesh, rules)
    host = _host_batch()
    g = to_global_batch(host, mesh, rules)
    for k in LAYOUT_KEYS:
        assert g[k].sharding == step_sharding, (k, g[k].sharding, step_sharding)
        assert {s.data.shape for s in g[k].addressable_shards} == {(rows_per_device, 16)}
        np.testing.assert_array_equal(np.asarray(g[k]), host[k])
    assert g["stage"].sharding == sh.batch_sharding(mesh, rules, ndim=1)
    # A step pinned to the rule's sharding takes the batch as it is (a mismatch is a jit error).
    step = jax.jit(lambda b: sum(jnp.sum(v) for v in b.values()),
                   in_shardings=({k: step_sharding for k in LAYOUT_KEYS},))
    total = step({k: g[k] for k in LAYOUT_KEYS})
    assert int(total) == sum(int(host[k].sum()) for k in LAYOUT_KEYS)


# ----------------------------------------------------------------------------- activations


def test_constrain_resolves_like_params_and_is_a_noop_without_a_mesh():
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = sh.rules_of(MeshConfig())
    names = ("batch", "length", "act_heads", None)
    fn = jax.jit(lambda x: sh.constrain(x * 2, names))
    # 8 heads divide the tensor axis of 4: sharded; 2 heads do not: replicated, as for params
    # (flax's resolver would have asked for tensor on both).
    for heads, head_spec in ((8, "tensor"), (2, None)):
        x = jnp.ones((4, 6, heads, 4))
        expect = sh.logical_to_spec(names, x.shape, mesh, rules)
        assert expect == P("fsdp", None, head_spec, None)
        with sh.activate(mesh, rules):
            y = fn(x)
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, expect), x.ndim), (heads, y.sharding)
        np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    # Without an active mesh nothing is constrained (one device, unchanged values).
    x = jnp.ones((4, 6, 8, 4))
    assert sh.constrain(x, names) is x
    assert len(jax.jit(lambda x: sh.constrain(x, names))(x).sharding.device_set) == 1
    with pytest.raises(ValueError, match="do not match shape"):
        sh.logical_to_spec(("batch",), (4, 6), mesh, rules)


# ----------------------------------------------------------------------------- the KV cache


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=4, max_position_embeddings=64)


def test_cache_is_built_with_the_sharding_sharding_py_defines():
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = sh.rules_of(MeshConfig())
    b, t = 4, 16
    kv_shape = (CFG.num_layers, b, t, CFG.num_kv_heads, CFG.head_size)
    want = KVCache(**sh.cache_shardings(kv_shape, mesh, rules))
    assert want.k.spec == P(None, "fsdp", None, "tensor", None) and want.groups.spec == P("fsdp", None)

    with sh.activate(mesh, rules):
        made = jax.jit(lambda: empty_cache(CFG, b, t))()
    for f in KVCache._fields:
        assert getattr(made, f).sharding.is_equivalent_to(getattr(want, f), getattr(made, f).ndim), f

    params = init_params(CFG, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    known = np.where(np.arange(t) < 5, np.arange(t), -1)[None].repeat(b, 0).astype(np.int32)
    groups = np.maximum(known, 0).astype(np.int32)
    run = jax.jit(lambda p, tok, pos, grp: prefill(CFG, p, tok, pos, grp))
    ref = run(params, tokens, known, groups)  # one device, no mesh
    assert len(ref.k.sharding.device_set) == 1
    put = lambda x: jax.device_put(x, sh.batch_sharding(mesh, rules))
    with sh.activate(mesh, rules):
        out = run(shard_params(params, CFG, mesh, rules), put(tokens), put(known), put(groups))
    for f in KVCache._fields:
        got = getattr(out, f)
        assert got.sharding.is_equivalent_to(getattr(want, f), got.ndim), (f, got.sharding)
        np.testing.assert_allclose(np.asarray(got), np.asarray(getattr(ref, f)), atol=1e-5)


# ----------------------------------------------------------------------------- the `auto` kernel


def test_auto_kernel_policy():
    auto = dataclasses.replace(CFG, attention="auto")
    # A forward over a whole layout: blockwise from 128 keys up, whatever the number of rows.
    assert choose_kernel(auto, 127) == "dense"
    assert choose_kernel(auto, 128) == "blockwise"
    # One cached step: up to 256 rows run dense against any cache; more rows go by the keys.
    assert choose_kernel(auto, 4096, step_rows=256) == "dense"
    assert choose_kernel(auto, 128, step_rows=257) == "blockwise"
    assert choose_kernel(auto, 127, step_rows=257) == "dense"
    # An explicit kernel is never overridden.
    for kind in ("dense", "blockwise"):
        cfg = dataclasses.replace(CFG, attention=kind)
        assert choose_kernel(cfg, 4096, step_rows=1) == kind and choose_kernel(cfg, 8) == kind
