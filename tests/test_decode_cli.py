"""`a3jax infill` / `a3jax generate` end to end on a real (tiny, random) params checkpoint."""
import json

import numpy as np
import pytest

from a3jax.cli import main
from a3jax.decode import cli as dcli
from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode.text import parse_masked, render
from test_decode_common import TINY_BYTE, tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from a3jax.checkpoint import save_params

    cfg, params = tiny(TINY_BYTE)
    return save_params(str(tmp_path_factory.mktemp("ckpt") / "tiny"), cfg, params)


TEXT = r"def add(a, b):\n    [MASK:6]\n"


@pytest.mark.slow
def test_infill_cli_keeps_context_and_fills_blank(ckpt, capsys):
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--color", "never", "--order", "confidence",
                 "--group-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):\n    ")
    assert "[MASK" not in out
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--json", "--order", "confidence",
                 "--group-size", "2"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["steps"] == 3 and len(obj["blanks"]) == 1
    assert obj["text"] == out[:len(obj["text"])]
    # the CLI is the Python API: same tokens as infill() on the parsed ids
    from a3jax.decode import DecodeSpec, infill
    tok = load_tokenizer("byte")
    ids, known, spans = parse_masked(dcli.unescape(TEXT), tok)
    assert spans == [(20, 26)] and ids[0] == tok.bos_id and (ids[~known] == tok.mask_id).all()
    cfg, params = tiny(TINY_BYTE)
    filled = infill(cfg, params, ids[None], known[None], DecodeSpec(order="confidence", group_size=2)).tokens[0]
    assert obj["blanks"][0] == tok.decode(filled[20:26])


def test_infill_cli_highlights_on_color(ckpt, capsys):
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--color", "always", "--order", "confidence",
                 "--group-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):\n    " + dcli.HILITE) and dcli.RESET in out


def test_infill_cli_errors(ckpt, capsys):
    assert main(["infill", "--ckpt", ckpt, "--text", "no blanks here"]) == 2
    assert "no blanks" in capsys.readouterr().err
    assert main(["infill", "--ckpt", ckpt, "--text", "a [MASK:3] b", "--order", "upside_down"]) == 2
    assert "unknown order" in capsys.readouterr().err
    assert main(["infill", "--ckpt", ckpt, "--text", "[MASK:300]"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_generate_cli(ckpt, capsys):
    assert main(["generate", "--ckpt", ckpt, "--prompt", "Hello", "--max-new-tokens", "5", "--json",
                 "--no-eos"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["results"][0]["prompt"] == "Hello" and obj["steps"] == 5
    assert main(["generate", "--ckpt", ckpt, "--prompt", "Hello", "--max-new-tokens", "5", "--no-eos",
                 "--color", "never"]) == 0
    assert capsys.readouterr().out.startswith("Hello" + obj["results"][0]["completion"])
    assert main(["generate", "--ckpt", ckpt, "--prompt", "x" * 250, "--max-new-tokens", "10"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_unescape_and_parse():
    assert dcli.unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    tok = load_tokenizer("byte")
    with pytest.raises(ValueError, match="at least one"):
        parse_masked("x [MASK:0]", tok)
    ids, known, spans = parse_masked("[MASK:2]ab[MASK:1]", tok)
    assert spans == [(1, 3), (5, 6)] and list(known) == [True, False, False, True, True, False]
    assert render(tok, np.array([256, 104, 105, 97, 98, 33]), spans) == "hiab!"
    assert render(tok, np.array([256, 104, 105, 97, 98, 33]), spans, ("<", ">")) == "<hi>ab<!>"


@pytest.mark.slow
def test_speculative_cli(ckpt, capsys):
    """--speculative K is the API's speculative=K: greedy gives the token-by-token completion."""
    args = ["generate", "--ckpt", ckpt, "--prompt", "Hello", "--max-new-tokens", "6", "--json", "--no-eos"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["results"] == plain["results"]
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--speculative", "2", "--group-size", "2"]) == 2
    assert "--group-size 2 does not apply" in capsys.readouterr().err
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--speculative", "2", "--order", "margin"]) == 2
    assert "fixed order" in capsys.readouterr().err


@pytest.mark.slow
def test_window_num_samples_and_mode_cli(ckpt, capsys):
    """--window, --num-samples and --mode reference are the API's window=, num_samples=, mode=."""
    from a3jax.decode import DecodeSpec, SamplingParams, generate
    args = ["generate", "--ckpt", ckpt, "--prompt", "Hi", "--prompt", "Yo", "--max-new-tokens", "6", "--json",
            "--no-eos", "--order", "confidence", "--window", "3", "--temperature", "1.0", "--seed", "2",
            "--num-samples", "3"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [(r["prompt"], r["sample"]) for r in res] == [(p, i) for p in ("Hi", "Yo") for i in range(3)]
    cfg, params = tiny(TINY_BYTE)
    tok = load_tokenizer("byte")
    new = generate(cfg, params, [[tok.bos_id] + list(tok.encode(p)) for p in ("Hi", "Yo")], 6,
                   DecodeSpec(order="confidence", window=3, stop_at_eos=False),
                   SamplingParams(temperature=1.0, seed=2, num_samples=3)).new
    assert [r["completion"] for r in res] == [tok.decode([int(x) for x in row if x not in (tok.pad_id, tok.eos_id)])
                                              for row in new]
    assert main(["infill", "--ckpt", ckpt, "--text", TEXT, "--mode", "reference", "--order", "left_to_right"]) == 2
    assert "mode='a3'" in capsys.readouterr().err
    assert main(["generate", "--ckpt", ckpt, "--prompt", "Hi", "--window", "2", "--order", "left_to_right"]) == 2
    assert "window=2 applies to the dynamic orders" in capsys.readouterr().err
