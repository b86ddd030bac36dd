"""Bad inputs: every problem named together, refused variants, truncated/corrupt files named."""
import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from hf_models import make_hf_llama
from test_convert_common import make_checkpoint, make_reference, read_all

from a3jax.convert import ConversionError, from_hf, from_reference
from a3jax.convert.cli import cli_main

pytestmark = pytest.mark.needs_torch  # the bad checkpoints are HF LLaMAs made with transformers/torch


def _rewrite(src, tensors):
    for f in os.listdir(src):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(src, f))
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_misshaped_reported_together(tmp_path):
    src = tmp_path / "hf"
    make_hf_llama(src, seed=1)
    t = read_all(str(src))
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    t["lm_head.weight"] = np.zeros((96, 32), np.float32)
    _rewrite(src, t)
    with pytest.raises(ConversionError) as e:
        from_hf(str(src))
    msg = str(e.value)
    assert str(src) in msg and "4 problem(s)" in msg
    assert "missing model.layers.1.mlp.up_proj.weight (expected shape (112, 64))" in msg
    assert "unexpected model.layers.0.self_attn.q_proj.bias with shape (64,)" in msg
    assert "model.layers.0.self_attn.k_proj.weight: shape (16, 64) in the checkpoint, expected (32, 64)" in msg
    assert "lm_head.weight: shape (96, 32) in the checkpoint, expected (96, 64)" in msg


def test_missing_tensors_in_sharded_bin(tmp_path):
    src = tmp_path / "hf"
    make_checkpoint(src, "sharded-bin", seed=2)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    # Drop one shard's entries from disk: rewrite it empty, so its keys go missing.
    import torch  # deferred: torch is optional

    name = sorted(set(index["weight_map"].values()))[0]
    lost = sorted(k for k, v in index["weight_map"].items() if v == name)
    torch.save({}, src / name)
    with pytest.raises(ConversionError) as e:
        from_hf(str(src))
    for k in lost:
        assert f"missing {k}" in str(e.value)


@pytest.mark.parametrize("change,needle", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"sliding_window": 4096}, "sliding_window is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "rope type 'dynamic'"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not a LLaMA model"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_refused_variants(tmp_path, change, needle):
    src = tmp_path / "hf"
    make_hf_llama(src, seed=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="config.json") as e:
        from_hf(str(src))
    assert needle in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    src = tmp_path / "hf"
    make_hf_llama(src, seed=1, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[1]
    path = src / shard
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-100], "garbage": b"\x13\x00not a safetensors file" * 5,
                      "empty": b""}[damage])
    with pytest.raises(ConversionError) as e:
        from_hf(str(src))
    assert str(path) in str(e.value) and "truncated or corrupt" in str(e.value)
    # The CLI turns it into a one-line error and exit code 1.
    assert cli_main(["hf-to-a3", "--hf", str(src), "--out", str(tmp_path / "ck"), "--no-progress"]) == 1
    assert not os.path.exists(tmp_path / "ck" / "params")


def test_truncated_bin_and_missing_shard_named(tmp_path):
    src = tmp_path / "hf"
    make_checkpoint(src, "single-bin", seed=1)
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConversionError, match=str(path)):
        from_hf(str(src))
    src2 = tmp_path / "hf2"
    make_hf_llama(src2, seed=1, max_shard_size="20KB")
    gone = sorted(f for f in os.listdir(src2) if f.endswith(".safetensors"))[0]
    os.remove(src2 / gone)
    with pytest.raises(ConversionError, match="lists files that do not exist") as e:
        from_hf(str(src2))
    assert gone in str(e.value)


def test_no_weights_no_config(tmp_path):
    with pytest.raises(ConversionError, match="config.json: not found"):
        from_hf(str(tmp_path))
    src = tmp_path / "hf"
    make_hf_llama(src, seed=1)
    os.remove(src / "model.safetensors")
    with pytest.raises(ConversionError, match="no weights found"):
        from_hf(str(src))


def test_bin_without_torch_says_so(tmp_path, monkeypatch):
    src = tmp_path / "hf"
    make_checkpoint(src, "single-bin", seed=1)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ConversionError, match="needs torch") as e:
        from_hf(str(src))
    assert "pytorch_model.bin" in str(e.value)


def test_tied_config_with_different_lm_head_refused(tmp_path):
    src = tmp_path / "hf"
    make_hf_llama(src, seed=1, tie=True)
    t = read_all(str(src))
    assert "lm_head.weight" not in t
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    _rewrite(src, t)
    from_hf(str(src))  # an identical copy is fine (torch state dicts of tied models carry it)
    t["lm_head.weight"][3, 4] += 1.0
    _rewrite(src, t)
    with pytest.raises(ConversionError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_hf(str(src))


def test_reference_missing_query_embed_and_bad_shape(tmp_path):
    src = tmp_path / "ref"
    make_reference(src, fmt="safetensors")
    t = read_all(str(src))
    t["model.query_embed"] = np.zeros((1, 64), np.float32)
    _rewrite(src, t)
    with pytest.raises(ConversionError, match=r"model.query_embed: shape \(1, 64\) in the checkpoint, expected \(1, 1, 64\)"):
        from_reference(str(src))
    del t["model.query_embed"]
    _rewrite(src, t)
    with pytest.raises(ConversionError, match=r"missing model.query_embed \(expected shape \(1, 1, 64\)\)"):
        from_reference(str(src))
