"""Config loading: files, section files, base chains, overrides, and errors that name the key."""
import os

import pytest

from a3jax.config import CONFIG_ROOT as CONFIG_ROOT_DIR
from a3jax.config import Config, ConfigError, ModelConfig, apply_overrides, build, load_config, to_dict


def write(path, text):
    path.write_text(text)
    return str(path)


def test_overrides_and_types(tmp_path):
    f = write(tmp_path / "c.yaml", "model:\n  hidden_size: 64\n  num_heads: 4\n  num_kv_heads: 2\nrun_dir: x\n")
    cfg = load_config(f, ["model.num_layers=3", "train.optimizer.learning_rate=1e-4", "model.tie_word_embeddings=true"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.tie_word_embeddings) == (64, 3, True)
    assert cfg.train.optimizer.learning_rate == 1e-4 and cfg.run_dir == "x"


def test_section_file_and_base(tmp_path):
    (tmp_path / "model").mkdir()
    write(tmp_path / "model" / "small.yaml", "hidden_size: 48\nnum_heads: 4\nnum_kv_heads: 4\n")
    write(tmp_path / "base.yaml", "model: small\ntrain:\n  global_batch_size: 4\n")
    f = write(tmp_path / "run.yaml", "base: base.yaml\ntrain:\n  microbatches: 2\n")
    cfg = load_config(f)
    assert cfg.model.hidden_size == 48 and cfg.train.global_batch_size == 4 and cfg.train.microbatches == 2


def test_stages_compact_and_long_form(tmp_path):
    f = write(tmp_path / "c.yaml", "data:\n  stages:\n    - ar: 5\n    - {strategy: 'blocks:2', steps: 7}\n")
    cfg = load_config(f)
    assert [(s.strategy, s.steps) for s in cfg.data.stages] == [("ar", 5), ("blocks:2", 7)]
    assert cfg.total_steps == 12
    assert build(Config, to_dict(cfg)) == cfg  # to_dict is build's inverse


@pytest.mark.parametrize("text,match", [
    ("model:\n  hiden_size: 3\n", "unknown key 'model.hiden_size'"),
    ("model:\n  hidden_size: big\n", "model.hidden_size must be an integer"),
    ("model:\n  hidden_size: 100\n  num_heads: 3\n", "model.num_heads: 3 does not divide hidden_size=100"),
    ("model:\n  num_heads: 8\n  num_kv_heads: 3\n", "num_kv_heads: 3 does not divide num_heads=8"),
    ("model:\n  block: weird\n", "model.block: 'weird' is not one of"),
    ("train:\n  global_batch_size: 6\n  microbatches: 4\n", "microbatches=4 does not divide"),
    ("data:\n  stages:\n    - ar: 0\n", "stages\\[0\\].steps must be positive"),
    ("data:\n  seq_len: 100000\n", "exceeds model.max_position_embeddings"),
])
def test_errors_name_key_and_file(tmp_path, text, match):
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(f)
    assert "bad.yaml" in str(e.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["model.hidden_size"])
    with pytest.raises(ConfigError, match="unknown key 'model.nope'"):
        load_config(None, ["model.nope=1"])


def test_shipped_model_configs_load():
    import os

    from a3jax.config import CONFIG_ROOT, load_model_config

    names = sorted(os.listdir(os.path.join(CONFIG_ROOT, "model")))
    assert {"tiny.yaml", "llama3.2-1b.yaml", "llama3.2-3b.yaml", "llama3.1-8b.yaml"} <= set(names)
    for n in names:
        assert isinstance(load_model_config(os.path.join(CONFIG_ROOT, "model", n)), ModelConfig)


def test_section_file_overrides_merge():
    cfg = load_config(os.path.join(CONFIG_ROOT_DIR, "base.yaml"), ["model=llama3.2-1b", "data=curriculum/paper",
                                                                   "data.seq_len=512"])
    assert cfg.model.hidden_size == 2048 and cfg.model.rope_type == "llama3"
    assert [s.steps for s in cfg.data.stages] == [800] * 5 and cfg.data.stages[0].strategy == "ar"
    assert cfg.data.seq_len == 512 and cfg.data.source == "stdlib"  # merged, not replaced
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, ["model=nope-70b"])


def test_section_mapping_with_base(tmp_path):
    (tmp_path / "model").mkdir()
    write(tmp_path / "model" / "small.yaml", "hidden_size: 48\nnum_heads: 4\nnum_kv_heads: 4\nnum_layers: 3\n")
    f = write(tmp_path / "c.yaml", "model:\n  base: small\n  num_layers: 5\n  block: reference\n")
    cfg = load_config(f)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.block) == (48, 5, "reference")
    with pytest.raises(ConfigError, match=r"c2\.yaml: model\.base must name a model file, got 3"):
        load_config(write(tmp_path / "c2.yaml", "model:\n  base: 3\n"))


@pytest.mark.parametrize("text,match", [
    ("model: [unclosed\n", r"bad\.yaml: not valid YAML \("),
    ("- 1\n- 2\n", r"bad\.yaml: the top level must be a mapping of keys, got list"),
    ("1: 2\n", r"bad\.yaml: keys must be strings, got 1"),
])
def test_one_yaml_reader_one_error_style(tmp_path, text, match):
    """A run config, a model.yaml (load_model_config and parse_model_config, which checkpoints on gs://
    use) and a curriculum file go through the same reader and fail the same way, naming the file."""
    from a3jax.config import load_model_config, parse_model_config
    from a3jax.data import load_curriculum

    f = write(tmp_path / "bad.yaml", text)
    for read in (load_config, load_model_config, lambda p: parse_model_config(open(p).read(), p), load_curriculum):
        with pytest.raises(ConfigError, match=match):
            read(f)
