"""HF LLaMA <-> a3jax: bit-exact round trips over dtypes / tying / layouts, transformers parity of the
exported directory, dtype casts, query_embed and tokenizer files, the CLI end to end."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from hf_models import hf_logits, make_hf_llama
from test_convert_common import assert_bit_exact, make_checkpoint, read_all, tree_bit_exact

from a3jax.checkpoint import load_model_config, load_params
from a3jax.convert import from_hf, to_hf
from a3jax.convert.cli import cli_main
from a3jax.convert.hf import QUERY_EMBED_FILE, config_from_hf, config_to_hf
from a3jax.model import forward, init_params

pytestmark = pytest.mark.needs_torch  # round trips through transformers' LLaMA

LAYOUTS = ["single-safetensors", "sharded-safetensors", "single-bin", "sharded-bin"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _files(d):
    return sorted(os.listdir(d))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_hf_a3_hf_bit_exact(tmp_path, layout, tie, dtype):
    src = tmp_path / "hf"
    make_checkpoint(src, layout, tie=tie, dtype=dtype, seed=3)
    files = _files(src)
    if "sharded" in layout:  # the layout under test really is sharded
        assert any(f.endswith(".index.json") for f in files), files
    if "bin" in layout:
        assert not any(f.endswith(".safetensors") for f in files), files
        assert any(f.endswith(".bin") for f in files), files
    cfg, params = from_hf(str(src))
    assert cfg.param_dtype == dtype and cfg.tie_word_embeddings == tie and cfg.block == "llama"
    assert ("lm_head" in params) != tie
    assert cfg.objective == "ar"  # a plain LLaMA
    a3 = dataclasses.replace(cfg, objective="a3")  # as if adapted: its query vector travels with it
    out = tmp_path / "out"
    to_hf(a3, params, str(out))
    original = read_all(str(src))
    exported = read_all(str(out))
    assert_bit_exact(original, exported)
    # query_embed kept beside the HF weights, and read back by from_hf.
    assert os.path.exists(out / QUERY_EMBED_FILE)
    cfg2, params2 = from_hf(str(out))
    tree_bit_exact(params, params2)
    assert cfg2 == a3


def test_exported_dir_loads_in_transformers_same_logits_as_content_stream(tmp_path):
    import transformers  # deferred: transformers is optional

    tokens = np.array([[1, 5, 9, 17, 33, 65, 2, 40, 41, 42, 7, 8]], np.int32)
    for tie, rope in ((False, LLAMA3_ROPE), (True, None)):
        src = tmp_path / f"hf{tie}"
        model = make_hf_llama(src, tie=tie, rope_scaling=rope, dtype="float32", seed=5)
        cfg, params = from_hf(str(src))
        ours = np.asarray(forward(cfg, params, tokens, stream="content"))
        out = tmp_path / f"out{tie}"
        to_hf(cfg, params, str(out), max_shard_bytes=30_000)  # sharded export with an index
        assert os.path.exists(out / "model.safetensors.index.json")
        loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
        assert loaded.config.tie_word_embeddings == tie
        if rope:
            assert loaded.config.rope_parameters["rope_type"] == "llama3"
            assert loaded.config.rope_parameters["factor"] == 8.0
        theirs = hf_logits(loaded, tokens)
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(hf_logits(model, tokens), theirs, atol=1e-5, rtol=0)


def test_config_json_readable_by_transformers4_style_keys(tmp_path):
    """The exported config carries both forms: rope_parameters (v5) and rope_theta + rope_scaling (v4)."""
    src = tmp_path / "hf"
    make_hf_llama(src, rope_scaling=LLAMA3_ROPE, seed=2)
    cfg, _ = from_hf(str(src))
    hf = config_to_hf(cfg)
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"]["rope_type"] == "llama3"
    assert hf["rope_parameters"]["rope_theta"] == 500000.0
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    assert config_from_hf(v4) == config_from_hf(v5) == config_from_hf(hf)
    assert config_from_hf(hf, param_dtype=cfg.param_dtype, objective="ar") == cfg


def test_dtype_casts_match_torch(tmp_path):
    import torch  # deferred: torch is optional

    src = tmp_path / "hf"
    model = make_hf_llama(src, dtype="float32", seed=4)
    cfg, params = from_hf(str(src), dtype="bf16")
    assert cfg.param_dtype == "bfloat16" and params["embed"].dtype.name == "bfloat16"
    want = model.model.embed_tokens.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(params["embed"].view(np.int16), want)
    wq = model.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params["layers"]["wq"][1].astype(np.float32).reshape(64, -1), wq.T)
    # bf16 -> fp32 is exact, and back to bf16 reproduces the bits.
    src16 = tmp_path / "hf16"
    make_hf_llama(src16, dtype="bfloat16", seed=4)
    cfg32, p32 = from_hf(str(src16), dtype="fp32")
    assert cfg32.param_dtype == "float32" and p32["layers"]["w_down"].dtype == np.float32
    out = tmp_path / "out"
    to_hf(cfg32, p32, str(out), dtype="bf16")
    assert_bit_exact(read_all(str(src16)), read_all(str(out)))


def test_params_layout_matches_init_params(tmp_path):
    """from_hf gives exactly the tree (names, shapes) that the model declares."""
    src = tmp_path / "hf"
    make_hf_llama(src, seed=6, head_dim=32)  # head_dim != hidden/heads
    cfg, params = from_hf(str(src))
    assert cfg.head_size == 32
    ref = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: tuple(x.shape), ref) == jax.tree.map(np.shape, params)
    assert {x.dtype for x in jax.tree.leaves(ref)} == {x.dtype for x in jax.tree.leaves(params)}
    emb = params["embed"].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(params["query_embed"], emb, atol=1e-6)


def test_ar_model_exports_no_query_vector_and_comes_back_with_its_embedding_mean(tmp_path):
    """An ar-trained model never trained query_embed (it holds its random-init value): a3-to-hf leaves
    it out (removing a stale file), so hf-to-a3 starts it from the trained embeddings' mean, as for a
    released LLaMA. An A3 model's trained vector is kept."""
    src = tmp_path / "hf"
    make_hf_llama(src, seed=8)
    cfg, params = from_hf(str(src))
    assert cfg.objective == "ar"  # a plain LLaMA: a causal LM until adapted
    params = dict(params, query_embed=np.full_like(params["query_embed"], 0.5))  # "trained" by A3
    out = tmp_path / "out"
    to_hf(dataclasses.replace(cfg, objective="a3"), params, str(out))
    a3_cfg, a3_params = from_hf(str(out))
    assert a3_cfg.objective == "a3"
    np.testing.assert_array_equal(a3_params["query_embed"], params["query_embed"])
    to_hf(dataclasses.replace(cfg, objective="ar"), params, str(out))  # same dir: the stale file goes
    assert not os.path.exists(out / QUERY_EMBED_FILE)
    back_cfg, back = from_hf(str(out))
    assert back_cfg.objective == "ar"
    np.testing.assert_allclose(back["query_embed"], params["embed"].astype(np.float64).mean(axis=0), atol=1e-6)


def test_cli_hf_to_a3_to_hf(tmp_path, capsys):
    src = tmp_path / "hf"
    make_hf_llama(src, dtype="bfloat16", seed=7, max_shard_size="20KB")
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "special_tokens_map.json").write_text("{}")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(["hf-to-a3", "--hf", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "hf-to-a3:" in msg and "bfloat16" in msg and "parameters" in msg
    assert {"params", "model.yaml", "tokenizer.json", "special_tokens_map.json"} <= set(os.listdir(ckpt))
    cfg, params = load_params(str(ckpt))
    cfg_ref, params_ref = from_hf(str(src))
    assert cfg == cfg_ref
    tree_bit_exact(params_ref, {k: np.asarray(v) if not isinstance(v, dict) else
                                {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in params.items()})
    # Refuses to overwrite without --force; --force works.
    assert cli_main(["hf-to-a3", "--hf", str(src), "--out", str(ckpt), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["hf-to-a3", "--hf", str(src), "--out", str(ckpt), "--no-progress", "--force"]) == 0
    assert cli_main(["a3-to-hf", "--ckpt", str(ckpt), "--out", str(out), "--max-shard-size", "30KB"]) == 0
    assert os.path.exists(out / "model.safetensors.index.json")
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert_bit_exact(read_all(str(src)), read_all(str(out)))
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "bfloat16"


def test_cli_dtype_flag_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("hf-to-a3", "a3-to-hf", "reference-to-a3", "a3-to-reference"):
        assert cmd in text
    with pytest.raises(SystemExit) as e:
        cli_main(["hf-to-a3", "--help"])
    assert e.value.code == 0 and "--dtype" in capsys.readouterr().out
    src = tmp_path / "hf"
    make_hf_llama(src, dtype="float32", seed=8)
    ckpt = tmp_path / "ckpt"
    assert cli_main(["hf-to-a3", "--hf", str(src), "--out", str(ckpt), "--dtype", "bf16", "--no-progress"]) == 0
    assert load_model_config(str(ckpt)).param_dtype == "bfloat16"
