"""The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF (fetched by `make install`), converted by
`a3jax convert gguf-to-a3`, against transformers' own GGUF loading (an independent implementation:
its own reader, dequantizer, tokenizer builder and LLaMA). fp32 throughout."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from smollm2 import gguf_path

from a3jax.checkpoint import load_params
from a3jax.config import load_config
from a3jax.convert.cli import cli_main
from a3jax.convert.hf import hf_tensors_of
from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode import DecodeSpec, generate, infill
from a3jax.demo import final_params
from a3jax.eval.tasks import A3Evaluator
from a3jax.model import forward
from a3jax.score import log_likelihood

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Größe: 日本語のテキスト — naïve café",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The GGUF converted by the CLI: (ckpt dir, cfg with the layer loop scanned, params)."""
    out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
    assert cli_main(["gguf-to-a3", "--gguf", gguf_path(), "--out", out, "--no-progress"]) == 0
    cfg, params = load_params(out)
    # the same model with the layer loop as lax.scan: a quarter of the compile time on 30 layers
    return out, dataclasses.replace(cfg, scan_layers=True), params


@pytest.fixture(scope="module")
def hf_model():
    import torch  # deferred: tests only
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _hf_logits(model, ids):
    import torch  # deferred: tests only

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.slow
@pytest.mark.needs_torch
def test_conversion_metadata_and_every_tensor_equals_transformers(ckpt, hf_model):
    out, cfg, params = ckpt
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    # the published 134,515,008 weights plus a3jax's query vector
    n = sum(int(np.prod(np.shape(x))) for x in __import__("jax").tree.leaves(params))
    assert n == 134_515_008 + cfg.hidden_size
    # named config = the converted one (what model=smollm2-135m model.init_from=CKPT relies on), except
    # the objective: the converted LLaMA is a causal LM (ar), the named config trains it to A3
    assert cfg.objective == "ar"
    named = load_config(None, ["model=smollm2-135m"]).model
    assert dataclasses.replace(named, scan_layers=True) == dataclasses.replace(cfg, scan_layers=True,
                                                                               objective=named.objective)
    # every tensor, in HF layout (q/k rows un-permuted), equals transformers' dequantized tensor exactly
    theirs = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    ours = dict(hf_tensors_of(cfg, jax_to_np(params)))
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for key, thunk in ours.items():
        np.testing.assert_array_equal(thunk(), theirs[key], err_msg=key)
    tok_cfg = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tok_cfg["add_bos_token"] is False and tok_cfg["eos_token"] == "<|im_end|>"


def jax_to_np(tree):
    return __import__("jax").tree.map(np.asarray, tree)


@pytest.mark.slow
@pytest.mark.needs_torch
def test_content_stream_logits_match_transformers(ckpt, hf_model):
    out, cfg, params = ckpt
    tok = load_tokenizer(out)
    rows = [tok.encode(t) for t in TEXTS]
    n = max(len(r) for r in rows)
    batch = np.full((len(rows), n), cfg.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r  # right padding: causal rows never see it
    ours = np.asarray(forward(cfg, params, batch, stream="content"))
    for i, r in enumerate(rows):
        theirs = _hf_logits(hf_model, [r])[0]
        assert np.abs(theirs).max() > 10  # real logits, not a degenerate model
        np.testing.assert_allclose(ours[i, :len(r)], theirs, atol=2e-4, rtol=0, err_msg=TEXTS[i])


TOKENIZER_TEXTS = [
    "Hello world", "  two leading spaces", "trailing   ", "tabs\tand\t\ttabs", "new\nlines\n\n\nhere\r\n",
    "x = [1, 22, 333, 4444]\nfor i in range(10):\n\tprint(i ** 2)  # square\n",
    "naïve façade, Ελληνικά, русский, 中文, 日本語, 한국어, emoji 😀👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "it's we'll they're I'M", "", " ",
]


@pytest.mark.slow
@pytest.mark.needs_torch
def test_tokenizer_matches_transformers_gguf_tokenizer(ckpt, hf_tok):
    out, cfg, _ = ckpt
    tok = load_tokenizer(out)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.add_bos) == (1, 2, 2, 49152, False)
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, repr(text)
        assert tok.decode(ids) == text, repr(text)
    # the special tokens are single ids
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    # SmolLM's pre-tokenizer (GGUF pre `smollm`, as llama.cpp and SmolLM's tokenizer.json) isolates every
    # digit before GPT-2's split, so a whitespace run before a digit stays one token: 'x', '  ', '1'.
    # transformers' GGUF tokenizer lacks that step and gives 'x', ' ', ' ', '1'.
    vocab = tok._tok.get_vocab()
    assert tok.encode("x  1") == [vocab["x"], vocab["\u0120\u0120"], vocab["1"]]
    assert hf_tok("x  1", add_special_tokens=False).input_ids == [vocab["x"], vocab["\u0120"], vocab["\u0120"],
                                                                  vocab["1"]]


@pytest.mark.slow
@pytest.mark.needs_torch
def test_greedy_generation_matches_transformers_cached_and_uncached(ckpt, hf_model):
    import torch  # deferred: tests only

    out, cfg, params = ckpt
    tok = load_tokenizer(out)
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    n = 12  # the uncached decode is one full forward per token: a short continuation keeps it cheap
    cached = generate(cfg, params, prompts, n, DecodeSpec(stop_at_eos=False, stream="content")).new
    uncached = generate(cfg, params, prompts, n, DecodeSpec(stop_at_eos=False, stream="content", use_cache=False)).new
    np.testing.assert_array_equal(cached, uncached)
    for p, row in zip(prompts, cached):
        with torch.no_grad():
            want = hf_model.generate(torch.as_tensor([p]), max_new_tokens=n, do_sample=False,
                                     eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, len(p):]
        assert row.tolist() == want.tolist(), (tok.decode(row), tok.decode(want.tolist()))
    assert tok.decode(cached[0]).startswith(" Paris")


@pytest.mark.slow
@pytest.mark.needs_torch
def test_content_stream_evaluation_equals_transformers_log_likelihood(ckpt, hf_model):
    import torch  # deferred: tests only

    out, cfg, params = ckpt
    tok = load_tokenizer(out)
    ev = A3Evaluator(cfg, params, tok, batch_size=2, stream="content")
    context, choices = "The capital of France is", [" Paris", " Berlin"]
    got = ev.loglikelihood([(context, c) for c in choices])
    ctx = tok.encode(context)  # add_bos is false: no BOS before a non-empty context
    for (ll, greedy), c in zip(got, choices):
        ids = ctx + tok.encode(c)
        logp = torch.log_softmax(torch.as_tensor(_hf_logits(hf_model, [ids])[0]), -1).numpy()
        want = sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids)))
        assert ll == pytest.approx(float(want), abs=1e-3)
    assert got[0][0] > got[1][0] and got[0][1]  # Paris is likelier, and the greedy continuation
    # rolling log-likelihood of a text (BOS prefix conditions the first token)
    text = TEXTS[0]
    ids = [tok.bos_id] + tok.encode(text)
    logp = torch.log_softmax(torch.as_tensor(_hf_logits(hf_model, [ids])[0]), -1).numpy()
    want = sum(logp[i - 1, ids[i]] for i in range(1, len(ids)))
    assert ev.rolling_loglikelihood([text])[0] == pytest.approx(float(want), abs=1e-3)


@pytest.mark.slow
def test_a3_training_starts_from_the_converted_model(ckpt, tmp_path):
    """A3 smoke test (real adaptation needs an accelerator): `a3jax train` with model.init_from on one
    device, loss finite and lower after 3 steps on one fixed batch; then log_likelihood under AR groups
    = the teacher-forced sum of the query stream's log-probs (the KV-cached decoder)."""
    out, cfg, _ = ckpt
    tok = load_tokenizer(out)
    text = "The quick brown fox jumps over the lazy dog."
    n = len(tok.encode(text))
    corpus = tmp_path / "c.jsonl"
    # every document is BOS + text + EOS = one whole row, and `ar` groups are fixed: every batch is the same
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(8)))
    overrides = [
        "model=smollm2-135m", f"model.init_from={out}", f"run_dir={tmp_path / 'run'}",
        f"data.source={corpus}", f"data.tokenizer={out}", f"data.seq_len={n + 2}", "data.heldout_fraction=0.0",
        "data.prefetch=0", "data.stages=[{ar: 4}]", "data.eval_strategies=[]", "train.global_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.optimizer.learning_rate=1e-4",
        "train.optimizer.warmup_steps=0", "train.optimizer.schedule=constant", "checkpoint.every=4",
        "checkpoint.async_save=false"]
    # one CPU device (this process has 8 fake ones): batch 2 needs no sharding. Full optimisation (not
    # the suite's level 0): at 135M parameters running the steps costs more than compiling them.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "a3jax", "train", *overrides, "--no-progress"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [rec["loss"] for rec in map(json.loads, f) if rec.get("kind") == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[3] < losses[0] - 0.05, losses
    run = load_config(None, overrides)
    params = final_params(run)
    mcfg = run.model
    ids = np.asarray([tok.bos_id] + tok.encode(text[:24]))
    target = np.arange(len(ids)) > 0  # BOS conditions, it is not scored
    ll = log_likelihood(mcfg, params, ids[None], np.arange(len(ids)), target_mask=target[None])
    known = ~target
    res = infill(mcfg, params, ids[None], known[None], DecodeSpec(order="left_to_right", group_size=1, teacher_forcing=True))
    np.testing.assert_array_equal(res.tokens[0], ids)
    assert (res.step[0, 1:] == np.arange(len(ids) - 1)).all()  # one token per step, left to right
    assert float(ll[0]) == pytest.approx(float(res.logprobs[0].sum()), abs=2e-3)
    assert -20 * len(ids) < float(ll[0]) < 0
