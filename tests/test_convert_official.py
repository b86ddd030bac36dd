"""Reference-A3-code checkpoints <-> a3jax: bit-exact round trips (.safetensors and .bin), block official,
and the a3jax forward with block official against an independent numpy re-implementation of the
reference code's two-stream decoder layer."""
import dataclasses
import os

import numpy as np
import pytest

from test_convert_common import assert_bit_exact, make_official, read_all

from a3jax.checkpoint import load_model_config
from a3jax.convert import ConversionError, from_hf, from_official, to_hf, to_official
from a3jax.convert.cli import cli_main
from a3jax.model import forward


@pytest.mark.parametrize("fmt,tie,dtype", [("safetensors", False, "float32"), ("bin", False, "bfloat16"),
                                           ("safetensors", True, "bfloat16"), ("bin", True, "float32")])
def test_official_roundtrip_bit_exact(tmp_path, fmt, tie, dtype):
    src = tmp_path / "ref"
    _, _, sd = make_official(src, fmt=fmt, tie=tie, dtype=dtype)
    cfg, params = from_official(str(src))
    assert cfg.block == "official" and cfg.param_dtype == dtype and cfg.tie_word_embeddings == tie
    qe = sd["model.query_embed"].float().numpy().reshape(-1)
    np.testing.assert_array_equal(params["query_embed"].astype(np.float32), qe)
    out = tmp_path / "out"
    to_official(cfg, params, str(out), fmt=fmt)
    assert os.path.exists(out / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors"))
    assert_bit_exact(read_all(str(src)), read_all(str(out)))
    cfg2, params2 = from_official(str(out))
    assert cfg2 == cfg


def test_official_cli_roundtrip_across_formats(tmp_path, capsys):
    src = tmp_path / "ref"
    make_official(src, fmt="bin", dtype="bfloat16")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(["official-to-a3", "--official", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert "block=official" in capsys.readouterr().out
    assert load_model_config(str(ckpt)).block == "official"
    assert cli_main(["a3-to-official", "--ckpt", str(ckpt), "--out", str(out), "--format", "safetensors"]) == 0
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "pytorch_model.bin")
    assert_bit_exact(read_all(str(src)), read_all(str(out)))
    # a3-to-hf refuses an official-block model (HF LLaMA would compute another function).
    assert cli_main(["a3-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert "a3-to-official" in capsys.readouterr().err


def test_block_mismatch_refused(tmp_path):
    src = tmp_path / "ref"
    make_official(src)
    cfg, params = from_official(str(src))
    with pytest.raises(ConversionError, match="to_official"):
        to_hf(cfg, params, str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="to_hf"):
        to_official(dataclasses.replace(cfg, block="llama"), params, str(tmp_path / "o"))
    # The HF reader does not silently drop the reference code's query vector.
    with pytest.raises(ConversionError, match=r"unexpected model\.query_embed with shape \(1, 1, 64\)"):
        from_hf(str(src))


# ----------------------------------------------------------------------------- independent reference


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    f = pos[:, None] * inv[None]
    emb = np.concatenate([f, f], -1)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def reference_forward(sd, hf, tokens, groups, stream):
    """The reference code's two-stream model in float64 numpy: per layer, for each stream s,
    v = post_norm(h_s + attn(in_norm(h_s), K/V of in_norm(h_content))); h_s = v + mlp(v).
    Content rows see groups <= own, query rows groups < own; a row that sees nothing gets zero attention."""
    w = {k: v.double().numpy() for k, v in sd.items()}
    E, H, K = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    D, eps, theta = E // H, hf["rms_norm_eps"], hf.get("rope_parameters", {}).get("rope_theta", 10000.0)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    hc = w["model.embed_tokens.weight"][tokens]
    hq = np.broadcast_to(w["model.query_embed"].reshape(E), (T, E)).copy()
    see = {"content": groups[None, :] <= groups[:, None], "query": groups[None, :] < groups[:, None]}
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    for i in range(hf["num_hidden_layers"]):
        p = lambda n: w[f"model.layers.{i}.{n}"]  # noqa: E731
        xc = _rms(hc, p("input_layernorm.weight"), eps)
        k = _rope((xc @ p("self_attn.k_proj.weight").T).reshape(T, K, D), pos, theta)
        v = (xc @ p("self_attn.v_proj.weight").T).reshape(T, K, D)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        new = {}
        for name, h in (("content", hc), ("query", hq)):
            x = _rms(h, p("input_layernorm.weight"), eps)
            q = _rope((x @ p("self_attn.q_proj.weight").T).reshape(T, H, D), pos, theta)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
            s = np.where(see[name][None], s, -np.inf)
            m = np.max(s, -1, keepdims=True)
            e = np.where(see[name][None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
            z = e.sum(-1, keepdims=True)
            prob = np.where(z > 0, e / np.where(z > 0, z, 1), 0)
            a = np.einsum("hts,shd->thd", prob, v).reshape(T, H * D) @ p("self_attn.o_proj.weight").T
            vv = _rms(h + a, p("post_attention_layernorm.weight"), eps)
            mlp = (silu(vv @ p("mlp.gate_proj.weight").T) * (vv @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
            new[name] = vv + mlp
        hc, hq = new["content"], new["query"]
    h = _rms(hc if stream == "content" else hq, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_block_official_matches_numpy_reference(tmp_path, tie):
    src = tmp_path / "ref"
    _, hf, sd = make_official(src, fmt="safetensors", tie=tie, seed=11)
    cfg, params = from_official(str(src))
    rng = np.random.default_rng(0)
    T = 12
    tokens = rng.integers(0, hf["vocab_size"], size=T)
    groups = rng.permutation(np.repeat(np.arange(4), 3))  # 4 random groups of 3, in a random order
    for stream in ("query", "content"):
        ours = np.asarray(forward(cfg, params, tokens[None], groups=groups[None], stream=stream))[0]
        ref = reference_forward(sd, hf, tokens, groups, stream)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # And the llama block would differ: the check can fail.
    llama = np.asarray(forward(dataclasses.replace(cfg, block="llama"), params, tokens[None],
                               groups=groups[None], stream="query"))[0]
    assert np.abs(llama - reference_forward(sd, hf, tokens, groups, "query")).max() > 1e-2
