"""Reference-A3-code checkpoints <-> a3jax: bit-exact round trips (.safetensors and .bin), block reference,
and the a3jax forward with block reference against an independent numpy re-implementation of the
reference code's two-stream decoder layer."""
import dataclasses
import os

import numpy as np
import pytest

from test_convert_common import assert_bit_exact, make_checkpoint, make_reference, read_all, tree_bit_exact

from a3jax.checkpoint import load_model_config
from a3jax.convert import ConversionError, from_hf, from_reference, to_hf, to_reference
from a3jax.convert.cli import cli_main
from a3jax.model import forward

pytestmark = pytest.mark.needs_torch  # the reference checkpoints are written with torch


@pytest.mark.parametrize("fmt,tie,dtype", [("safetensors", False, "float32"), ("bin", False, "bfloat16"),
                                           ("safetensors", True, "bfloat16"), ("bin", True, "float32")])
def test_reference_roundtrip_bit_exact(tmp_path, fmt, tie, dtype):
    src = tmp_path / "ref"
    _, _, sd = make_reference(src, fmt=fmt, tie=tie, dtype=dtype)
    cfg, params = from_reference(str(src))
    assert cfg.block == "reference" and cfg.param_dtype == dtype and cfg.tie_word_embeddings == tie
    assert cfg.objective == "a3"  # the reference code trains A3 models
    qe = sd["model.query_embed"].float().numpy().reshape(-1)
    np.testing.assert_array_equal(params["query_embed"].astype(np.float32), qe)
    out = tmp_path / "out"
    to_reference(cfg, params, str(out), fmt=fmt)
    assert os.path.exists(out / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors"))
    assert_bit_exact(read_all(str(src)), read_all(str(out)))
    cfg2, params2 = from_reference(str(out))
    assert cfg2 == cfg


def test_reference_cli_roundtrip_across_formats(tmp_path, capsys):
    src = tmp_path / "ref"
    make_reference(src, fmt="bin", dtype="bfloat16")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(["reference-to-a3", "--reference", str(src), "--out", str(ckpt), "--no-progress"]) == 0
    assert "block=reference" in capsys.readouterr().out
    assert load_model_config(str(ckpt)).block == "reference"
    assert cli_main(["a3-to-reference", "--ckpt", str(ckpt), "--out", str(out), "--format", "safetensors"]) == 0
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "pytorch_model.bin")
    assert_bit_exact(read_all(str(src)), read_all(str(out)))
    # a3-to-hf refuses an reference-block model (HF LLaMA would compute another function).
    assert cli_main(["a3-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 1
    assert "a3-to-reference" in capsys.readouterr().err


def test_block_mismatch_refused(tmp_path):
    src = tmp_path / "ref"
    make_reference(src)
    cfg, params = from_reference(str(src))
    with pytest.raises(ConversionError, match="to_reference"):
        to_hf(cfg, params, str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="to_hf"):
        to_reference(dataclasses.replace(cfg, block="llama"), params, str(tmp_path / "o"))
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
def test_block_reference_matches_numpy_reference(tmp_path, tie):
    src = tmp_path / "ref"
    _, hf, sd = make_reference(src, fmt="safetensors", tie=tie, seed=11)
    cfg, params = from_reference(str(src))
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


# ----------------------------------------------------------------------------- HF Trainer output folders

LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")
DECOYS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One reference checkpoint (single model.safetensors) and what from_reference reads from it."""
    src = tmp_path_factory.mktemp("ref") / "ref"
    _, hf, sd = make_reference(src, fmt="safetensors", seed=5)
    cfg, params = from_reference(str(src))
    return src, sd, cfg, params


def write_trainer_checkpoint(d, src, sd, layout, decoys=True):
    """What HF Trainer leaves in a checkpoint-N folder of the reference script: config.json, the
    weights in `layout` (huggingface_hub's writer, which save_pretrained uses: model.safetensors,
    model-0000i-of-0000n.safetensors + index, pytorch_model.bin, or .bin shards + index), and the
    training state, each written by torch as Trainer writes it."""
    import argparse
    import random
    import shutil

    import torch
    from huggingface_hub import save_torch_state_dict

    os.makedirs(d, exist_ok=True)
    shutil.copy(src / "config.json", d / "config.json")
    if layout is not None:
        save_torch_state_dict(sd, str(d), max_shard_size="20KB" if layout.startswith("sharded") else "5GB",
                              safe_serialization=layout.endswith("safetensors"))
        names = os.listdir(d)
        assert (len([n for n in names if n.endswith((".safetensors", ".bin"))]) > 1) == layout.startswith("sharded")
    if decoys:
        # optimizer.pt: a real AdamW state after one step; its moments have the weights' shapes
        ps = [torch.nn.Parameter(v.float().clone()) for v in sd.values()]
        opt = torch.optim.AdamW(ps, lr=1e-3)
        sum((p * p).sum() for p in ps).backward()
        opt.step()
        torch.save(opt.state_dict(), d / "optimizer.pt")
        torch.save(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), d / "scheduler.pt")
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                    "cpu": torch.random.get_rng_state()}, d / "rng_state.pth")
        torch.save(argparse.Namespace(output_dir=str(d.parent), learning_rate=2e-5), d / "training_args.bin")
        with open(d / "trainer_state.json", "w") as f:
            f.write('{"global_step": 1}')


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_checkpoint_folder_every_layout(tmp_path, reference, layout):
    src, sd, cfg, params = reference
    d = tmp_path / "run" / "checkpoint-800"
    write_trainer_checkpoint(d, src, sd, layout)
    cfg2, params2 = from_reference(str(d))
    assert cfg2 == cfg
    tree_bit_exact(params, params2)


def test_trainer_state_alone_is_a_clear_error(tmp_path, reference, capsys):
    src, sd, _, _ = reference
    d = tmp_path / "checkpoint-50"
    write_trainer_checkpoint(d, src, sd, layout=None)
    with pytest.raises(ConversionError) as e:
        from_reference(str(d))
    msg = str(e.value)
    assert msg.startswith(f"{d}: no weights found")
    assert all(n in msg for n in DECOYS + ("config.json",)) and "training state" in msg
    # the CLI says the same and writes nothing
    assert cli_main(["reference-to-a3", "--reference", str(d), "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no weights found" in err and "optimizer.pt" in err and not os.path.exists(tmp_path / "ckpt" / "params")


def test_trainer_output_folder_picks_highest_checkpoint(tmp_path, reference, capsys):
    src, sd, cfg, params = reference
    run = tmp_path / "run"
    older = {k: v + 1 for k, v in sd.items()}  # other weights: picking them would show
    # 9 < 50 < 100 numerically, but "checkpoint-9" sorts last as a string
    write_trainer_checkpoint(run / "checkpoint-9", src, older, "safetensors")
    write_trainer_checkpoint(run / "checkpoint-50", src, older, "bin")
    write_trainer_checkpoint(run / "checkpoint-100", src, sd, "sharded-safetensors")
    (run / "tokenizer_config.json").write_text("{}")  # the final save's tokenizer, at the top only
    logs = []
    _, got = from_reference(str(run), log=logs.append)
    tree_bit_exact(params, got)
    assert len(logs) == 1 and "checkpoint-100" in logs[0] and "checkpoint-9" in logs[0]
    ckpt = tmp_path / "ckpt"
    assert cli_main(["reference-to-a3", "--reference", str(run), "--out", str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "using checkpoint-100" in out.err and "tokenizer_config.json" in out.out
    assert os.path.exists(ckpt / "tokenizer_config.json")

    # The final save_model at the top wins over the checkpoints.
    for k, v in older.items():
        older[k] = v + 1
    write_trainer_checkpoint(run, src, older, "safetensors", decoys=False)
    logs = []
    _, top = from_reference(str(run), log=logs.append)
    np.testing.assert_array_equal(top["final_norm"], np.asarray(older["model.norm.weight"]))
    assert len(logs) == 1 and "top" in logs[0]


def test_newest_checkpoint_without_weights_is_refused(tmp_path, reference):
    src, sd, _, _ = reference
    run = tmp_path / "run"
    write_trainer_checkpoint(run / "checkpoint-50", src, sd, "safetensors")
    write_trainer_checkpoint(run / "checkpoint-100", src, sd, layout=None)  # a save cut short
    with pytest.raises(ConversionError) as e:
        from_reference(str(run))
    msg = str(e.value)
    assert str(run / "checkpoint-100") in msg and "optimizer.pt" in msg and str(run / "checkpoint-50") in msg


def test_plain_llama_needs_from_llama(tmp_path):
    src = tmp_path / "llama"
    make_checkpoint(src, "single-safetensors", seed=3)
    with pytest.raises(ConversionError, match=r"(?s)missing model\.query_embed.*--from-llama"):
        from_reference(str(src))
    logs = []
    cfg, params = from_reference(str(src), from_llama=True, log=logs.append)
    hcfg, hparams = from_hf(str(src))
    assert cfg.block == "reference" and cfg.query_init == "normal" and "plain LLaMA" in logs[0]
    assert cfg.objective == "ar"  # not adapted yet; a reference checkpoint (with its query vector) is a3
    tree_bit_exact({k: v for k, v in hparams.items() if k != "query_embed"},
                   {k: v for k, v in params.items() if k != "query_embed"})
    q = params["query_embed"].astype(np.float64)
    assert q.shape == (64,) and abs(q.mean()) < 0.4 and 0.7 < q.std() < 1.3  # N(0, 1), not the tiny embed mean
