"""Sources, tokenizers, the held-out split, ArrayRecord prepare and bad inputs."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

from a3jax.config import DataConfig, StageConfig
from a3jax.data import (ByteTokenizer, EmptyCorpusError, TokenizerError, build_rows, load_corpus,
                        load_tokenizer, make_train_iterator)
from a3jax.data.checks import check_batch
from a3jax.data.prepare import cli_main, prepare
from a3jax.data.sources import in_split, resolve_files

TOK = ByteTokenizer()


# ----------------------------------------------------------------------------- tokenizers


@given(st.text(max_size=200))
def test_byte_tokenizer_roundtrip(text):
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOK.decode(ids) == text
    assert np.array_equal(TOK.encode_np(text), np.asarray(ids, np.int32))


def test_byte_tokenizer_ids_match_model_defaults():
    from a3jax.config import ModelConfig

    m = ModelConfig()
    t = load_tokenizer("byte")
    assert (t.bos_id, t.eos_id, t.pad_id, t.mask_id, t.vocab_size) == (256, 257, 258, 259, 260)
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id, m.vocab_size) == (256, 257, 258, 260)
    assert t.decode([104, 105, 256, 0xFF]) == "hi\ufffd"  # specials dropped, bad bytes replaced


def _make_hf_tokenizer(path, specials=("<s>", "</s>", "<pad>")):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *specials])
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello fox"], trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def test_hf_tokenizer_from_model_dir(tmp_path):
    d = tmp_path / "model"
    raw = _make_hf_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "pad_token": "<pad>"}))
    t = load_tokenizer(str(d))
    assert (t.bos_id, t.eos_id, t.pad_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"),
                                              raw.token_to_id("<pad>"))
    assert t.vocab_size == raw.get_vocab_size()
    ids = t.encode("hello fox")
    assert ids == [raw.token_to_id("hello"), raw.token_to_id("fox")] and t.bos_id not in ids
    assert t.decode(ids).replace(" ", "") == "hellofox"
    # the file itself also works; config.json ids are a fallback; PAD falls back to EOS
    d2 = tmp_path / "m2"
    _make_hf_tokenizer(str(d2), specials=("<s>", "</s>"))
    (d2 / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    t2 = load_tokenizer(str(d2 / "tokenizer.json"))
    assert (t2.bos_id, t2.eos_id, t2.pad_id) == (1, 2, 2)


def test_hf_tokenizer_without_specials_names_the_file(tmp_path):
    d = tmp_path / "nospecial"
    _make_hf_tokenizer(str(d))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(str(d))
    assert str(d / "tokenizer.json") in str(e.value) and "BOS" in str(e.value)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<missing>"}))
    with pytest.raises(TokenizerError, match="<missing>"):
        load_tokenizer(str(d))
    with pytest.raises(FileNotFoundError, match="no/such/tok"):
        load_tokenizer(str(tmp_path / "no/such/tok"))


def test_pipeline_with_hf_tokenizer(tmp_path):
    d = tmp_path / "model"
    _make_hf_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                        "pad_token": "<pad>"}))
    src = tmp_path / "texts.jsonl"
    src.write_text("\n".join(json.dumps({"body": "hello world the quick brown fox " * (i + 1)})
                             for i in range(12)))
    t = load_tokenizer(str(d))
    cfg = DataConfig(source=str(src), text_field="body", tokenizer=str(d), seq_len=16, prefetch=0,
                     heldout_fraction=0.0, stages=(StageConfig("random:2", 10),))
    b = next(make_train_iterator(cfg, 4))
    check_batch(b, t.vocab_size, t.pad_id, t.bos_id)


# ----------------------------------------------------------------------------- sources


@pytest.fixture()
def messy_dir(tmp_path):
    d = tmp_path / "messy"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("first document\n")
    (d / "sub" / "b.md").write_text("second document, in a subfolder\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("   \n\n")
    (d / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01\x02" * 10)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / ".hidden").write_text("not read")
    return d


def test_text_folder_skips_and_counts_bad_files(messy_dir):
    c = load_corpus(str(messy_dir), TOK, split="all")
    assert c.keys == ["a.txt", os.path.join("sub", "b.md")]
    assert TOK.decode(c.doc(0)) == "first document\n"
    assert c.skips.counts == {"empty": 2, "binary": 1, "undecodable": 1}
    assert "latin1.txt" in c.skips.summary()


def test_glob_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "x1.txt").write_text("one")
    (tmp_path / "x2.txt").write_text("two")
    (tmp_path / "y.txt").write_text("not matched")
    c = load_corpus(str(tmp_path / "x*.txt"), TOK, split="all")
    assert [TOK.decode(c.doc(i)) for i in range(len(c))] == ["one", "two"]

    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "alpha"}\n\n{"text": ""}\n{"other": 1}\nnot json\n{"text": "beta"}\n')
    c = load_corpus(str(j), TOK, split="all")
    assert [TOK.decode(c.doc(i)) for i in range(len(c))] == ["alpha", "beta"]
    assert c.keys == ["d.jsonl:1", "d.jsonl:6"]
    assert c.skips.counts == {"empty": 1, "no_text_field_text": 1, "bad_json_line": 1}

    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["gamma", "delta", None]}), str(p))
    c = load_corpus(str(p), TOK, split="all", text_field="content")
    assert [TOK.decode(c.doc(i)) for i in range(len(c))] == ["gamma", "delta"]
    with pytest.raises(KeyError, match="content"):
        load_corpus(str(p), TOK, split="all", text_field="text")


def test_heldout_split_is_by_file_disjoint_and_covering(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"document {i}")
    tr = load_corpus(str(tmp_path), TOK, split="train", heldout_fraction=0.25)
    he = load_corpus(str(tmp_path), TOK, split="heldout", heldout_fraction=0.25)
    assert set(tr.keys).isdisjoint(he.keys)
    assert sorted(tr.keys + he.keys) == sorted(f"f{i}.txt" for i in range(60))
    assert 5 <= len(he) <= 25
    assert all(in_split(k, "heldout", 0.25) for k in he.keys)
    capped = load_corpus(str(tmp_path), TOK, split="train", heldout_fraction=0.25, max_documents=4)
    assert capped.keys == tr.keys[:4]


def test_stdlib_source_is_sorted_and_excludes_tests():
    root, files = resolve_files("stdlib")
    rel = [os.path.relpath(p, root) for p in files]
    assert len(rel) > 100 and all(r.endswith(".py") for r in rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split(os.sep))
    assert resolve_files("stdlib") == (root, files)  # deterministic
    assert rel.index("json/__init__.py") < rel.index("json/decoder.py")  # sorted walk


def test_missing_path_and_empty_corpus_errors(tmp_path, messy_dir):
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_corpus(missing, TOK)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_corpus(str(tmp_path / "nothing-here*.txt"), TOK)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        make_train_iterator(DataConfig(source=missing), 2)
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "e.txt").write_text("")
    (bad / "b.bin").write_bytes(b"\x00\x01")
    with pytest.raises(EmptyCorpusError) as e:
        load_corpus(str(bad), TOK, split="all")
    assert "allbad" in str(e.value) and "1 binary" in str(e.value) and "1 empty" in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load_corpus(str(messy_dir), TOK, split="validation")


# ----------------------------------------------------------------------------- prepare / ArrayRecord


def test_prepare_arrayrecord_roundtrip_and_pipeline(tmp_path, messy_dir):
    for i in range(30):
        (messy_dir / f"doc{i}.txt").write_text(f"document number {i} " * (i + 1))
    out = tmp_path / "prepared"
    meta = prepare(str(messy_dir), "byte", str(out), num_workers=0, docs_per_shard=8, progress=False)
    assert meta["num_documents"] == 32 and len(meta["shards"]) == 4
    assert meta["skipped"] == {"empty": 2, "binary": 1, "undecodable": 1}
    for split in ("all", "train", "heldout"):
        mem = load_corpus(str(messy_dir), TOK, split=split, heldout_fraction=0.2)
        ar = load_corpus(str(out), TOK, split=split, heldout_fraction=0.2)
        assert ar.keys == mem.keys
        assert np.array_equal(ar.lengths, mem.lengths)
        assert all(np.array_equal(ar.doc(i), mem.doc(i)) for i in range(len(mem)))
    cfg_m = DataConfig(source=str(messy_dir), seq_len=48, prefetch=0, heldout_fraction=0.2,
                       stages=(StageConfig("random:4", 5),))
    cfg_a = DataConfig(**{**cfg_m.__dict__, "source": str(out)})
    it_m, it_a = make_train_iterator(cfg_m, 4), make_train_iterator(cfg_a, 4)
    for _ in range(3):
        x, y = next(it_m), next(it_a)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # a prepared directory read with another tokenizer is refused, naming the metadata file
    d = tmp_path / "tok"
    _make_hf_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="a3jax_data.json"):
        load_corpus(str(out), load_tokenizer(str(d)))
    with pytest.raises(FileExistsError):
        prepare(str(messy_dir), "byte", str(out), progress=False)


def test_prepare_parallel_matches_serial_and_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"{i:02d}.txt").write_text("x" * (i * 7 + 1))
    (src / "zz.bin").write_bytes(b"\x00" * 4)
    assert cli_main(["prepare", "--source", str(src), "--out", str(tmp_path / "p2"), "--num-workers", "2",
                     "--quiet"]) == 0
    msg = capsys.readouterr().out
    assert "wrote 12 documents" in msg and "1 binary" in msg
    serial = prepare(str(src), "byte", str(tmp_path / "p1"), num_workers=0, progress=False)
    a = load_corpus(str(tmp_path / "p1"), TOK, split="all")
    b = load_corpus(str(tmp_path / "p2"), TOK, split="all")
    assert a.keys == b.keys and serial["num_tokens"] == sum(i * 7 + 1 for i in range(12))
    assert all(np.array_equal(a.doc(i), b.doc(i)) for i in range(len(a)))
    assert cli_main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "p3")]) == 1
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0 and "--tokenizer" in capsys.readouterr().out


def test_rows_fill_and_split_long_documents(tmp_path):
    (tmp_path / "long.txt").write_text("y" * 1000)
    (tmp_path / "short.txt").write_text("z" * 10)
    rows = build_rows(DataConfig(source=str(tmp_path), seq_len=64, heldout_fraction=0.0))
    total = sum(int((rows[i]["segment_ids"] != 0).sum()) for i in range(len(rows)))
    # 1000 y's in pieces of 63 (+BOS each), last piece +EOS; short doc BOS+10+EOS
    n_pieces = -(-(1000 - 62) // 63) + 1 if 1000 > 62 else 1
    assert total == 1000 + n_pieces + 1 + 12
    assert all(rows[i]["tokens"][0] == TOK.bos_id for i in range(len(rows)))
