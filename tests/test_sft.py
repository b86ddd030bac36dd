"""SFT data: the loss mask is exactly the response tokens (+ EOS), the context is laid out as decoding
lays out a prompt and comes before every response group; the chat template of the SmolLM2 GGUF renders
the text written here by hand; `a3jax train` with data.format=sft trains through the pretraining
trainer, from prompt/response JSONL."""
import json

import numpy as np
import pytest

from a3jax.config import StageConfig, load_config
from a3jax.data import ByteTokenizer, make_train_iterator
from a3jax.data.sft import SFTDataError, SFTRows
from a3jax.convert.gguf_io import GGUFFile
from a3jax.data import chat
from a3jax.train.trainer import train
from smollm2 import gguf_path

EXAMPLES = [("12+5=", "17"), ("reverse abc:", "cba"), ("hi", "hello there"), ("3*3=", "9"), ("x", "y")]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    lines = [json.dumps({"prompt": q, "response": a}) for q, a in EXAMPLES]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "ping"},
                                          {"role": "assistant", "content": "pong"}]}))
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.mark.parametrize("strategy", ["ar", "random:2", "blocks:2"])
def test_sft_rows_mask_exactly_the_response_tokens(sft_file, strategy):
    tok = ByteTokenizer()
    cfg = load_config(None, [f"data.source={sft_file}", "data.format=sft", "data.seq_len=32", "data.prefetch=0",
                             "data.heldout_fraction=0.0", f"data.stages=[{{'{strategy}': 10}}]"])
    it = make_train_iterator(cfg.data, 2)
    seen = set()
    for _ in range(3):
        b = next(it)
        for r in range(2):
            tokens, pos, grp, seg, loss = (b[k][r] for k in ("tokens", "positions", "groups", "segment_ids",
                                                             "loss_mask"))
            for s in set(seg.tolist()) - {0}:
                i = np.flatnonzero(seg == s)
                i = i[np.argsort(pos[i])]
                text = tok.decode(tokens[i])
                target = loss[i] == 1
                resp = tok.decode(tokens[i][target])
                context = tok.decode(tokens[i][~target])
                # every target is a response token (or the final EOS), and every response token a target
                assert tokens[i][0] == tok.bos_id and tokens[i][-1] == tok.eos_id and target[-1]
                assert target.sum() == len(resp.encode()) + 1
                assert context + resp == text and (context, resp) in set(EXAMPLES) | {("user: ping\n" +
                                                                                       chat.PLAIN_PROMPT, "pong\n")}
                assert np.all(target[np.argmax(target):]), "the response is one run after the context"
                assert grp[i][~target].max() < grp[i][target].min(), "the context precedes every response group"
                seen.add(context)
                if strategy == "ar":
                    assert (np.diff(grp[i]) == 1).all()
                if strategy == "random:2" and target.sum() > 3:
                    g = grp[i][target]
                    assert len(set(g)) < len(g), "the response is grouped by the stage's strategy"
    assert len(seen) >= 4


def test_sft_examples_need_prompt_and_response(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: .*`prompt` and `response`"):
        SFTRows(str(p), ByteTokenizer(), 32, heldout_fraction=0.0)
    p.write_text(json.dumps({"prompt": "a" * 40, "response": "b"}) + "\n")
    with pytest.raises(SFTDataError, match="no SFT example .* fits data.seq_len=32"):
        SFTRows(str(p), ByteTokenizer(), 32, heldout_fraction=0.0)


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_chat_template_renders_the_expected_text(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": GGUFFile(gguf_path()).get("tokenizer.chat_template")}))
    template = chat.template_of(str(tmp_path))  # where `a3jax convert` puts the GGUF's template
    assert template and "im_start" in template
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert chat.render(template, msgs) == (SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                           "<|im_start|>assistant\n4<|im_end|>\n")
    ctx, resp = chat.split(msgs, template)
    assert ctx == SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert resp == "4<|im_end|>\n"
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render(template, own, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(chat.ChatError, match="last message must be the assistant"):
        chat.split(own, template)


def test_plain_format_without_a_template():
    msgs = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    assert chat.split(msgs, None) == ("user: ping\nassistant: ", "pong\n")
    assert chat.template_of("byte") is None


def test_train_runs_sft_through_the_pretraining_trainer(sft_file, tmp_path):
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"data.source={sft_file}", "data.format=sft", "data.seq_len=32",
        "data.prefetch=0", "data.heldout_fraction=0.0", "data.stages=[{random:2: 4}]", "data.eval_strategies=[ar]",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.max_position_embeddings=64", "train.global_batch_size=8",
        "train.log_every=2", "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=4",
        ])
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["step"] == 4 and np.isfinite(out["loss"])
    assert (tmp_path / "run" / "final").is_dir()
    assert StageConfig("random:2", 4) in cfg.data.stages


@pytest.mark.parametrize("ov,key", [(["data.format=chat"], "data.format"),
                                    (["data.format=sft", "data.grouping_scope=batch"], "data.grouping_scope"),
                                    (["data.format=sft", "data.sft_response_pad=-1"], "data.sft_response_pad")])
def test_bad_sft_configs_name_the_key(ov, key):
    from a3jax.config import ConfigError
    with pytest.raises(ConfigError, match=key):
        load_config(None, ov)
