"""Story infilling, the A3 paper's ROCStories protocol: sentences 1-2 are the left context, sentences
4-5 the right context, sentence 3 is filled with its true token length, and ROUGE-1/2/L x 100 of the
fill against sentence 3 is reported over the first N stories.

Reads the CSV the user obtained under its own terms (never downloaded). Two layouts are accepted, by
their header: ROCStories (storyid, storytitle, sentence1 .. sentence5) and the Story Cloze Test
(InputStoryid, InputSentence1 .. InputSentence4, RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2,
AnswerRightEnding), whose fifth sentence is the correct ending.
"""
from __future__ import annotations

import csv
import io
from typing import List, Optional

from a3jax import fs

ROC = [f"sentence{i}" for i in range(1, 6)]
CLOZE = [f"InputSentence{i}" for i in range(1, 5)] + ["RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                                                       "AnswerRightEnding"]


class StoryError(ValueError):
    pass


def _sentences(row: dict, layout: str, where: str) -> List[str]:
    if layout == "rocstories":
        out = [row[c] for c in ROC]
    else:
        right = str(row["AnswerRightEnding"]).strip()
        if right not in ("1", "2"):
            raise StoryError(f"{where}: AnswerRightEnding must be 1 or 2, got {right!r}")
        out = [row[f"InputSentence{i}"] for i in range(1, 5)] + [row[f"RandomFifthSentenceQuiz{right}"]]
    out = [(s or "").strip() for s in out]
    if not all(out):
        raise StoryError(f"{where}: a story needs five non-empty sentences")
    return out


def load_stories(path: str, limit: Optional[int] = None) -> List[dict]:
    """The first `limit` stories as infill examples {left, answer, right} (a3jax.eval.tasks' infill kind)."""
    if not fs.isfile(path):
        raise FileNotFoundError(f"story CSV not found: {path}")
    reader = csv.DictReader(io.StringIO(fs.read_text(path)))
    header = reader.fieldnames or []
    if all(c in header for c in ROC):
        layout = "rocstories"
    elif all(c in header for c in CLOZE):
        layout = "cloze"
    else:
        raise StoryError(f"{path}: header {header} is neither ROCStories' (sentence1..sentence5) nor the Story "
                         f"Cloze Test's (InputSentence1..4, RandomFifthSentenceQuiz1/2, AnswerRightEnding)")
    out = []
    for i, row in enumerate(reader):
        if limit is not None and len(out) >= limit:
            break
        s = _sentences(row, layout, f"{path}:{i + 2}")
        out.append(dict(left=f"{s[0]} {s[1]} ", answer=s[2], right=f" {s[3]} {s[4]}"))
    if not out:
        raise StoryError(f"{path}: no stories")
    return out
