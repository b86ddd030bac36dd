"""model.init_from: training starts from a converted HF LLaMA (its AR weights), not from random init."""
import dataclasses

import jax
import numpy as np
import pytest

from a3jax.checkpoint import load_params, save_params
from a3jax.config import ConfigError
from a3jax.convert import from_hf
from a3jax.demo import final_params
from a3jax.train import train
from hf_models import make_hf_llama
from train_helpers import tiny_config, write_corpus

pytestmark = pytest.mark.needs_torch  # starts from a HF LLaMA made with transformers


@pytest.mark.slow
def test_training_starts_from_converted_hf_weights(tmp_path):
    # A HF LLaMA over the byte vocabulary (260), converted and saved as a params checkpoint.
    make_hf_llama(tmp_path / "hf", vocab=260, hidden=32, layers=2, heads=4, kv_heads=2, inter=64)
    mcfg, hf_params = from_hf(str(tmp_path / "hf"))
    mcfg = dataclasses.replace(mcfg, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                               max_position_embeddings=64)
    save_params(str(tmp_path / "ckpt"), mcfg, hf_params)

    corpus = write_corpus(str(tmp_path / "c.jsonl"))
    # lr 0: AdamW moves nothing, so the trained params must be exactly the converted ones; any random
    # init (or a dropped tensor) would show.
    cfg = tiny_config(tmp_path / "run", corpus, **{
        "model.init_from": str(tmp_path / "ckpt"), "model.intermediate_size": 64,
        "model.max_position_embeddings": 64, "train.optimizer.learning_rate": 0.0,
        "data.stages": "[{ar: 2}]", "train.eval_every": 0, "checkpoint.every": 2})
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rms_norm_eps=mcfg.rms_norm_eps,
                                                             rope_theta=mcfg.rope_theta))
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["step"] == 2
    trained = final_params(cfg)
    _, saved = load_params(str(tmp_path / "ckpt"))
    for path, a in jax.tree_util.tree_leaves_with_path(saved):
        b = dict(jax.tree_util.tree_leaves_with_path(trained))[path]
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b), err_msg=str(path))

    # A checkpoint whose architecture differs from the run's model is refused, naming the key.
    bad = dataclasses.replace(cfg, run_dir=str(tmp_path / "run2"),
                              model=dataclasses.replace(cfg.model, num_layers=3))
    with pytest.raises(ConfigError, match="num_layers"):
        train(bad, progress_bar=False, tensorboard=False)
