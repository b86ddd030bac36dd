"""Params-only Orbax checkpoints: save/load, restore onto a 2x4 mesh with the target shardings, identical
logits on the mesh and on one device, config beside the params, errors."""
import dataclasses
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from hf_models import make_hf_llama
from test_convert_common import tree_bit_exact

from a3jax.checkpoint import CheckpointError, load_model_config, load_params, save_params
from a3jax.config import MeshConfig, save_yaml
from a3jax.convert import from_hf
from a3jax.model import forward, param_shardings
from a3jax.sharding import activate, make_mesh, rules_of

pytestmark = pytest.mark.needs_torch  # its fixture is a converted HF LLaMA made with transformers


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    # kv_heads=2 on a tensor axis of 4 exercises the replicate-when-not-dividing rule.
    make_hf_llama(d / "hf", seed=9, vocab=96, hidden=64, heads=4, kv_heads=2, inter=128)
    cfg, params = from_hf(str(d / "hf"))
    save_params(str(d / "ck"), cfg, params)
    return str(d / "ck"), cfg, params


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_save_load_one_device_exact(converted):
    ck, cfg, params = converted
    assert os.path.isdir(os.path.join(ck, "params")) and os.path.isfile(os.path.join(ck, "model.yaml"))
    assert load_model_config(ck) == cfg
    cfg2, restored = load_params(ck)
    assert cfg2 == cfg
    leaves = jax.tree.leaves(restored)
    assert all(isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 for x in leaves)
    tree_bit_exact(params, _host(restored))


def test_restore_on_2x4_mesh_identical_logits(converted, tmp_path):
    ck, cfg, params = converted
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = rules_of(MeshConfig())
    cfg_m, sharded = load_params(ck, mesh=mesh, rules=rules)
    want = param_shardings(cfg, mesh, rules)
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(want)):
        assert x.sharding == sh, f"{path}: {x.sharding} != {sh}"
    # Really split: each device holds only a part of the big matrices.
    wq = sharded["layers"]["wq"]
    assert wq.sharding.spec[1:3] == ("fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.num_heads // 4,
                                                   cfg.head_size)
    assert sharded["lm_head"].addressable_shards[0].data.size == params["lm_head"].size // 8
    tree_bit_exact(params, _host(sharded))
    _, single = load_params(ck)
    tokens = np.array([[1, 4, 9, 16, 25, 36, 49, 64, 81, 2]], np.int32)
    groups = np.array([[0, 3, 3, 1, 2, 2, 4, 1, 4, 0]], np.int32)
    with activate(mesh, rules):
        on_mesh = np.asarray(forward(cfg_m, sharded, tokens, groups=groups))
    on_one = np.asarray(forward(cfg, single, tokens, groups=groups))
    # Params are bit-identical (above); the sharded matmuls reduce in another order, so logits agree to fp32
    # rounding (observed max |diff| ~2e-7), not bit for bit.
    np.testing.assert_allclose(on_mesh, on_one, atol=2e-6, rtol=0)
    # Saving the mesh-sharded arrays (as after training) writes the same params; force overwrites.
    save_params(str(tmp_path / "from_mesh"), cfg_m, sharded)
    save_params(str(tmp_path / "from_mesh"), cfg_m, sharded, force=True)
    tree_bit_exact(params, load_params(str(tmp_path / "from_mesh"), host=True)[1])
    assert np.isfinite(on_one).all() and np.abs(on_one).max() > 0


def test_load_with_dtype_cast(converted):
    ck, cfg, params = converted
    cfg16, p16 = load_params(ck, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and p16["embed"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(p16["embed"]), params["embed"].astype(ml_dtypes.bfloat16))


def test_save_refuses_overwrite_and_mismatched_params(converted, tmp_path):
    ck, cfg, params = converted
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(ck, cfg, params)
    bad = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size * 2)
    with pytest.raises(CheckpointError, match="do not match the config"):
        save_params(str(tmp_path / "x"), bad, params)
    assert not os.path.exists(tmp_path / "x" / "params")
    # Saving jax arrays (e.g. after training) also works and round-trips.
    _, restored = load_params(ck)
    save_params(str(tmp_path / "again"), cfg, restored)
    tree_bit_exact(params, _host(load_params(str(tmp_path / "again"))[1]))


def test_load_errors_name_the_path(tmp_path, converted):
    with pytest.raises(CheckpointError, match="nowhere: not found"):
        load_params(str(tmp_path / "nowhere"))
    ck, cfg, _ = converted
    d = tmp_path / "mismatch"
    d.mkdir()
    os.symlink(os.path.join(ck, "params"), d / "params")
    save_yaml(dataclasses.replace(cfg, num_layers=cfg.num_layers + 1), str(d / "model.yaml"))
    with pytest.raises(CheckpointError, match="does not match model.yaml") as e:
        load_params(str(d))
    assert "layers/wq: shape (2, 64, 4, 16) in the checkpoint, expected (3, 64, 4, 16)" in str(e.value)
    assert "layers/attn_norm: shape (2, 64) in the checkpoint, expected (3, 64)" in str(e.value)


def test_load_to_host_numpy(converted):
    ck, cfg, params = converted
    cfg_h, host = load_params(ck, host=True)
    assert cfg_h == cfg
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(host))
    tree_bit_exact(params, host)
