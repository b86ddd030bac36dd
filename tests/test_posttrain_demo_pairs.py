"""The post-training demonstration's several-answers task: every SFT completion is a valid pair, the
reward accepts exactly the valid answers, and the SFT data covers several answers per prompt (the
property that makes decoding an answer as one parallel group able to mix two answers)."""
import json
import os
import re

from a3jax.config import load_config
from a3jax.posttrain import config as rl_config, rewards
from a3jax.posttrain.demo import any_answer, make_pairs, pair_answers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _target(prompt):
    m = re.fullmatch(r"sum:(\d+)=", prompt)
    assert m, prompt
    return int(m.group(1))


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_pair_answers_by_hand():
    assert pair_answers(1) == ["0+1", "1+0"]
    assert pair_answers(7) == ["0+7", "1+6", "2+5", "3+4", "4+3", "5+2", "6+1", "7+0"]
    assert pair_answers(17) == ["8+9", "9+8"]


def test_reward_accepts_exactly_the_valid_answers():
    ex = {"prompt": "sum:7=", "answers": pair_answers(7)}
    for good in ("3+4", "0+7", "7+0", " 5+2 ", "6+1\nanything after the first line"):
        assert any_answer(good, ex) == 1.0, good
    # mixed modes (3 from 3+4, 3 from 4+3), wrong sums, other forms, trailing junk on the line
    for bad in ("3+3", "4+4", "3+5", "34", "3 + 4", "7", "", "3+4+0", "3+4x", "8+-1", "\n3+4"):
        assert any_answer(bad, ex) == 0.0, bad
    # every two-digit string a+b: accepted iff a + b is the target
    for n in (1, 9, 13, 17):
        e = {"answers": pair_answers(n)}
        for a in range(10):
            for b in range(10):
                assert any_answer(f"{a}+{b}", e) == float(a + b == n)


def test_sft_data_is_valid_and_covers_several_answers(tmp_path):
    paths = make_pairs(str(tmp_path), n_sft=2000)
    seen = {}
    for row in _rows(paths["sft"]):
        n = _target(row["prompt"])
        a, plus, b = row["response"]
        assert plus == "+" and int(a) + int(b) == n, row
        seen.setdefault(n, set()).add(row["response"])
    assert sorted(seen) == list(range(1, 18))
    for n, got in seen.items():
        assert len(got) >= 2 and len(got) == min(n, 18 - n) + 1, (n, got)  # every valid pair occurs
    for name in ("rl", "eval"):
        rows = _rows(paths[name])
        assert [_target(r["prompt"]) for r in rows] == list(range(1, 18))
        for r in rows:
            assert len(r["answers"]) >= 2 and all(any_answer(x, r) for x in r["answers"])


def test_configs_load_and_name_the_reward():
    cfg = rl_config.load(os.path.join(ROOT, "configs", "rl", "pairs.yaml"))
    built = rewards.build([(r.name, r.weight, r.args) for r in cfg.rewards])
    assert [r.fn for r in built] == [any_answer] and cfg.decode.group_size == 1
    sft = load_config(os.path.join(ROOT, "configs", "sft", "pairs.yaml"))
    assert sft.train.objective == "a3" and sft.data.format == "sft" and sft.total_steps == 400
