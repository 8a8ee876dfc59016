"""Evaluation: language-model loss / perplexity / accuracy."""

from turbolm.eval.lm import evaluate_lm

__all__ = ["evaluate_lm"]
