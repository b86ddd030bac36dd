"""A training run as a checkpoint: `a3jax export RUN_DIR OUT` writes a params checkpoint with the
run's tokenizer beside it (so `--tokenizer auto` decodes with it), and every reader of a params
checkpoint takes the run directory itself (its latest complete checkpoint)."""
import dataclasses
import filecmp
import json
import os
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from a3jax.checkpoint import (CheckpointError, export_run, load_model_config, load_params, run_steps,
                              tokenizer_spec)
from a3jax.cli import main as a3jax_main
from a3jax.data import load_tokenizer
from a3jax.train import train
from test_convert_common import tree_bit_exact
from train_helpers import tiny_config

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    """A tiny run trained on a word-level tokenizer (not the byte one): counting in words."""
    d = tmp_path_factory.mktemp("wordrun")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text(tok.to_str())
    (d / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    rng = np.random.default_rng(0)
    with open(d / "corpus.jsonl", "w") as f:
        for _ in range(200):
            start, n = int(rng.integers(12)), int(rng.integers(10, 30))
            f.write(json.dumps({"text": " ".join(WORDS[(start + i) % 12] for i in range(n))}) + "\n")
    cfg = tiny_config(d / "run", d / "corpus.jsonl", **{
        "data.tokenizer": str(d / "tok"), "model.vocab_size": tok.get_vocab_size(),
        "model.bos_token_id": tok.token_to_id("<s>"), "model.eos_token_id": tok.token_to_id("</s>"),
        "model.pad_token_id": tok.token_to_id("</s>"), "data.stages": "[{ar: 4}]", "train.eval_every": 0,
        "checkpoint.every": 2})
    train(cfg, progress_bar=False, tensorboard=False)
    return d, cfg


def test_export_writes_params_and_the_runs_tokenizer(word_run, tmp_path, capsys):
    d, cfg = word_run
    out = tmp_path / "final"
    assert a3jax_main(["export", str(d / "run"), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {"params", "model.yaml", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert filecmp.cmp(d / "tok" / "tokenizer.json", out / "tokenizer.json", shallow=False)
    # the run's model config, plus the context layout its training used (its last stage, ar: left to right)
    assert load_model_config(str(out)) == dataclasses.replace(cfg.model, prompt_group_size=1)
    # the latest checkpoint's params, as the run stored them (fp32 master weights)
    _, from_run = load_params(str(d / "run"), host=True)
    _, exported = load_params(str(out), host=True)
    tree_bit_exact(from_run, exported)
    assert run_steps(str(d / "run")) == [2, 4]
    # an earlier step on request, and it differs from the latest (training moved the weights)
    export_run(str(d / "run"), str(tmp_path / "at2"), step=2)
    _, at2 = load_params(str(tmp_path / "at2"), host=True)
    assert not np.array_equal(at2["embed"], exported["embed"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 3"):
        export_run(str(d / "run"), str(tmp_path / "at3"), step=3)


def test_auto_tokenizer_of_an_export_is_the_runs(word_run, tmp_path, capsys):
    d, _ = word_run
    out = export_run(str(d / "run"), str(tmp_path / "final"))
    # Moved away from the training tokenizer's directory, the export still carries its own.
    shutil.move(str(d / "tok"), str(tmp_path / "tok_moved"))
    try:
        assert tokenizer_spec(out) == out
        ref = Tokenizer.from_file(str(tmp_path / "tok_moved" / "tokenizer.json"))
        assert load_tokenizer(tokenizer_spec(out)).encode("three four five") == [
            ref.token_to_id(w) for w in ("three", "four", "five")]
        argv = ["generate", "--ckpt", out, "--prompt", "one two three", "--max-new-tokens", "4", "--no-eos",
                "--json"]
        assert a3jax_main(argv) == 0
        auto = json.loads(capsys.readouterr().out)["results"]
        assert a3jax_main(argv + ["--tokenizer", str(tmp_path / "tok_moved")]) == 0
        assert auto == json.loads(capsys.readouterr().out)["results"]
        # words of the run's tokenizer (bytes would not even fit its 15-token vocabulary)
        words = auto[0]["completion"].split()
        assert words and set(words) <= set(ref.get_vocab()), auto
    finally:
        shutil.move(str(tmp_path / "tok_moved"), str(d / "tok"))


def test_a_run_directory_is_a_checkpoint(word_run, tmp_path):
    d, cfg = word_run
    run = str(d / "run")
    trained = dataclasses.replace(cfg.model, prompt_group_size=1)  # the layout the run recorded
    assert load_model_config(run) == trained
    assert tokenizer_spec(run) == str(d / "tok")
    cfg_r, params = load_params(run)
    assert cfg_r == trained and all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    # `a3jax convert a3-to-hf --ckpt RUN_DIR`: the run's latest params, with its tokenizer files
    assert a3jax_main(["convert", "a3-to-hf", "--ckpt", run, "--out", str(tmp_path / "hf")]) == 0
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))


def test_neither_checkpoint_nor_run_names_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CheckpointError, match=r"neither a params checkpoint .* nor a training run .*"
                                              r"it holds notes.txt, sub"):
        load_params(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a params checkpoint"):
        load_model_config(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()  # a run that has not saved yet
    with pytest.raises(CheckpointError, match="without a complete checkpoint"):
        load_params(str(tmp_path))
    assert a3jax_main(["export", str(tmp_path / "sub"), str(tmp_path / "out")]) == 1
    assert not os.path.exists(tmp_path / "out")
