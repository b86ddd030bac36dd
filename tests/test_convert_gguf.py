"""GGUF -> a3jax on tiny files written here with llama.cpp's writer (tests/gguf_models.py): F32 files
equal from_hf bit for bit (q/k rows un-permuted), quantized types dequantize as the gguf package does,
logits and SentencePiece ids equal transformers' own GGUF loading, llama3 rope_freqs, every refusal
names its key, the CLI, and base-model decoding / evaluation through the CLIs."""
import json
import os

import numpy as np
import pytest

from gguf_models import llamacpp_permute, spm_vocab, write_llama_gguf
from hf_models import hf_logits, make_hf_llama

from a3jax.checkpoint import load_params
from a3jax.convert import ConversionError, build_tokenizer, from_gguf, from_hf, write_tokenizer
from a3jax.convert.cli import cli_main
from a3jax.convert.gguf_io import GGUFFile
from a3jax.convert.hf import hf_tensors_of
from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode import DecodeError, DecodeSpec, generate
from a3jax.decode.cli import generate_main
from a3jax.eval.cli import cli_main as eval_main
from a3jax.model import forward

pytestmark = pytest.mark.needs_torch  # the GGUF files are written from transformers models

V = len(spm_vocab()[0])
QTYPES = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1",
          "blk.0.ffn_down.weight": "Q5_0", "blk.1.ffn_up.weight": "Q5_1", "blk.1.attn_v.weight": "F16",
          "blk.1.attn_k.weight": "Q8_0", "output.weight": "BF16"}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _tiny(tmp_path, name="m", **kw):
    kw = {"vocab": V, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "inter": 128, **kw}
    return make_hf_llama(tmp_path / f"{name}_hf", **kw)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_gguf_equals_from_hf_bit_exact(tmp_path, tie):
    model = _tiny(tmp_path, tie=tie, seed=1)
    path = write_llama_gguf(tmp_path / "m.gguf", model)
    cfg, params = from_gguf(path)
    ref_cfg, ref = from_hf(str(tmp_path / "m_hf"))
    assert cfg.tie_word_embeddings == tie and ("lm_head" in params) != tie
    assert cfg.objective == "ar"  # a GGUF LLaMA is a causal LM until adapted
    assert cfg == ref_cfg.__class__(**{**ref_cfg.__dict__, "pad_token_id": -1})  # the file has no padding id
    flat = lambda t: {k: v for k, v in t.items() if k != "layers"} | {"layers." + k: v for k, v in t["layers"].items()}  # noqa: E731
    a, b = flat(params), flat(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k


def test_quantized_types_dequantize_as_the_gguf_package_does(tmp_path):
    import gguf  # deferred: tests only

    model = _tiny(tmp_path, seed=2)
    path = write_llama_gguf(tmp_path / "q.gguf", model, types=QTYPES)
    cfg, params = from_gguf(path, progress=True)
    ours = {k: t() for k, t in hf_tensors_of(cfg, params)}
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hf_of = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    for name, qt in QTYPES.items():
        key = hf_of.get(name) or ("model.layers." + name.split(".")[1] + "." + {
            "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
            "ffn_up.weight": "mlp.up_proj.weight"}[name.split(".", 2)[2]])
        w = sd[key]
        heads = {"attn_q.weight": 4, "attn_k.weight": 2}.get(name.split(".", 2)[-1])
        stored = llamacpp_permute(w, heads) if heads else w
        qtype = gguf.GGMLQuantizationType[qt]
        want = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype).reshape(w.shape)
        if heads:  # undo llama.cpp's row order with the inverse permutation of the row indices
            rows = llamacpp_permute(np.arange(w.shape[0])[:, None], heads)[:, 0]
            want = want[np.argsort(rows)]
        np.testing.assert_array_equal(ours[key], want, err_msg=f"{name} ({qt})")
        assert not np.array_equal(ours[key], w) or qt == "F16", f"{name}: {qt} should be lossy"


def test_quantized_logits_and_spm_tokenizer_match_transformers_gguf_loading(tmp_path):
    import torch  # deferred: tests only
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny(tmp_path, seed=3)
    path = write_llama_gguf(tmp_path / "q.gguf", model, types=QTYPES)
    cfg, params = from_gguf(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32).eval()
    tokens = np.array([[1, 5, 9, 17, 33, 65, 2, 40, 41, 42, 7, 8, 280, 288]], np.int32)
    ours = np.asarray(forward(cfg, params, tokens, stream="content"))
    np.testing.assert_allclose(ours, hf_logits(theirs, tokens), atol=1e-4, rtol=0)
    # the SentencePiece vocabulary (no merges in the file: recovered from the scores)
    out = tmp_path / "tok"
    assert write_tokenizer(path, str(out)) == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    tok = load_tokenizer(str(out))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="q.gguf")
    vocab = tok._tok.get_vocab()
    for text in ["the cat", "hello world", "the  cat\tsat", "héllo wörld ☃", " leading", "</s>the<s>", "wordle"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        # decode(encode(x)) == x, except that SentencePiece's prefix space swallows one leading space
        assert tok.decode(ids) == (text[1:] if text.startswith(" ") else text), text
    assert tok.encode("the cat") == [vocab["\u2581the"], vocab["\u2581cat"]]
    assert tok.encode("☃") == [vocab["\u2581"]] + [vocab[f"<0x{b:02X}>"] for b in "☃".encode()]  # byte fallback


def test_llama3_rope_freqs_are_read_and_checked(tmp_path):
    model = _tiny(tmp_path, seed=4, rope_scaling=LLAMA3_ROPE)
    ref_cfg, _ = from_hf(str(tmp_path / "m_hf"))
    # llama.cpp's rope_freqs: 1 (high frequencies), factor (low), smoothed in between
    from a3jax.convert.gguf_io import llama3_rope_factors

    freqs = llama3_rope_factors(ref_cfg)
    assert freqs.min() == pytest.approx(1.0) and freqs.max() == pytest.approx(8.0)
    kv = {"llama.rope.scaling.original_context_length": 64}
    cfg, _ = from_gguf(write_llama_gguf(tmp_path / "r.gguf", model, rope_freqs=freqs, extra_kv=kv))
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 64)
    assert cfg.rope_theta == ref_cfg.rope_theta
    with pytest.raises(ConversionError, match="rope_freqs.weight does not match llama3"):
        from_gguf(write_llama_gguf(tmp_path / "bad.gguf", model, rope_freqs=freqs * 1.5, extra_kv=kv))


@pytest.mark.parametrize("case, match", [
    ("arch", "general.architecture is 'qwen2'"),
    ("yarn", "llama.rope.scaling.type='yarn' is not supported"),
    ("missing", r"missing tensor blk.1.ffn_up.weight \(expected shape \(64, 128\)\)"),
    ("bias", "unexpected tensor blk.0.attn_q.bias"),
    ("tokenizer", "tokenizer.ggml.model='bert' is not supported"),
    ("pre", "tokenizer.ggml.pre='qwen2' is not supported"),
    ("truncated", "cannot read GGUF file"),
])
def test_refusals_name_the_key(tmp_path, case, match):
    model = _tiny(tmp_path, seed=5)
    kw = {}
    if case == "arch":
        kw["arch"] = "qwen2"
    elif case == "yarn":
        kw["extra_kv"] = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    elif case == "missing":
        kw["drop"] = ("blk.1.ffn_up.weight",)
    elif case == "bias":
        kw["extra_tensors"] = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    elif case == "tokenizer":
        kw["tokenizer"] = "bert"
    elif case == "pre":
        kw["tokenizer"] = "gpt2"
        kw["extra_kv"] = {"tokenizer.ggml.pre": "qwen2"}
    path = write_llama_gguf(tmp_path / "x.gguf", model, **kw)
    if case == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(ConversionError, match=match):
        if case in ("tokenizer", "pre"):
            build_tokenizer(GGUFFile(path))
        else:
            from_gguf(path)


def test_cli_gguf_to_a3_then_base_model_generation_and_evaluation(tmp_path, capsys):
    import torch  # deferred: tests only

    model = _tiny(tmp_path, seed=6)
    path = write_llama_gguf(tmp_path / "m.gguf", model)
    ckpt = tmp_path / "ckpt"
    assert cli_main(["gguf-to-a3", "--gguf", path, "--out", str(ckpt), "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "gguf-to-a3:" in msg and "F32" in msg and "tokenizer.json" in msg
    assert {"params", "model.yaml", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(ckpt))
    assert cli_main(["gguf-to-a3", "--gguf", path, "--out", str(ckpt), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    cfg, params = load_params(str(ckpt))
    tok = load_tokenizer(str(ckpt))
    # generate --stream content = DecodeSpec(stream="content") = greedy decoding of the source HF model
    prompt = "the cat"
    assert generate_main(["--ckpt", str(ckpt), "--prompt", prompt, "--stream", "content", "--max-new-tokens", "6",
                          "--no-eos", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["completion"]
    ids = [tok.bos_id] + tok.encode(prompt)  # this vocabulary adds BOS (add_bos_token true)
    new = generate(cfg, params, [ids], 6, DecodeSpec(stop_at_eos=False, stream="content")).new[0]
    with torch.no_grad():
        want = model.generate(torch.as_tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert new.tolist() == want
    assert got == tok.decode([t for t in want if t not in (tok.pad_id, tok.eos_id)])
    assert generate_main(["--ckpt", str(ckpt), "--prompt", prompt, "--stream", "content", "--order", "random"]) == 2
    assert "--order does not apply" in capsys.readouterr().err
    with pytest.raises(DecodeError, match="group_size=2 does not apply"):
        generate(cfg, params, [ids], 4, DecodeSpec(group_size=2, stream="content"))
    # eval --stream content: perplexity = the source model's causal log-likelihood
    text = "hello world the cat"
    task = tmp_path / "ppl.jsonl"
    task.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "res.json"
    assert eval_main(["--task", str(task), "--ckpt", str(ckpt), "--stream", "content", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["ppl.jsonl"]["perplexity"]
    seq = [tok.bos_id] + tok.encode(text)
    logp = torch.log_softmax(torch.as_tensor(hf_logits(model, [seq])[0]), -1).numpy()
    nll = -sum(logp[i - 1, seq[i]] for i in range(1, len(seq))) / (len(seq) - 1)
    assert res["nll_per_token"] == pytest.approx(float(nll), abs=1e-4)
    # the lm-eval adapter with stream=content: the same causal log-likelihood through lm-eval's request objects
    from lm_eval.api.instance import Instance

    from a3jax.eval.lm_eval_adapter import A3JaxLM

    lm = A3JaxLM(ckpt=str(ckpt), stream="content", batch_size=2)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("hello world", " the cat"), idx=0)
    (ll, _), = lm.loglikelihood([req])
    ctx, cont = tok.encode("hello world"), tok.encode(" the cat")
    seq = [tok.bos_id] + ctx + cont  # add_bos_token is true for this vocabulary
    logp = torch.log_softmax(torch.as_tensor(hf_logits(model, [seq])[0]), -1).numpy()
    assert ll == pytest.approx(float(sum(logp[i - 1, seq[i]] for i in range(1 + len(ctx), len(seq)))), abs=1e-4)
    infill_task = tmp_path / "inf.jsonl"
    infill_task.write_text(json.dumps({"left": "the", "answer": " cat", "right": ""}) + "\n")
    assert eval_main(["--task", str(infill_task), "--ckpt", str(ckpt), "--stream", "content"]) == 2
    assert "infill tasks need the query stream" in capsys.readouterr().err
