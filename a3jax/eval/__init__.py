"""Evaluation: JSONL tasks (multiple choice, infilling ROUGE, QA exact match, perplexity) and an
lm-evaluation-harness adapter (model name `a3jax`). See docs/evaluate.md."""
from a3jax.eval.tasks import KINDS, A3Evaluator, TaskError, load_task, run_task

__all__ = ["A3Evaluator", "KINDS", "TaskError", "load_task", "run_task"]
