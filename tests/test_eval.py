"""evaluate_lm: loss / perplexity / accuracy computed per token, independent of batch size."""

import math

import numpy as np
import pytest
import torch

from turbolm.errors import DataError
from turbolm.eval import evaluate_lm


class _Uniform(torch.nn.Module):
    """Equal logits for every id, so argmax is id 0 and the loss is ln(V)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


class _Oracle(torch.nn.Module):
    """Knows the sequence is `i -> (i + 1) % V`: accuracy 1, loss near 0."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        nxt = (idx + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 50.0, None


def test_uniform_model_scores_ln_vocab():
    tokens = np.arange(200) % 7
    m = evaluate_lm(_Uniform(10), tokens, batch_size=3, context=16)
    assert m["loss"] == pytest.approx(math.log(10))
    assert m["perplexity"] == pytest.approx(10.0)
    targets = tokens[1 : 1 + m["tokens"]]
    assert m["accuracy"] == pytest.approx(np.mean(targets == 0))


def test_oracle_and_batch_size_independence():
    tokens = np.arange(500) % 11
    a = evaluate_lm(_Oracle(11), tokens, batch_size=1, context=10)
    b = evaluate_lm(_Oracle(11), tokens, batch_size=7, context=10)
    assert a["accuracy"] == 1.0 and a["loss"] < 1e-6
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-9)


def test_max_batches_and_restores_training_mode():
    model = _Uniform(5).train()
    m = evaluate_lm(model, np.zeros(1000, dtype=np.int64), batch_size=2, context=8, max_batches=3)
    assert m["tokens"] == 3 * 2 * 8
    assert model.training


def test_too_few_tokens():
    with pytest.raises(DataError):
        evaluate_lm(_Uniform(5), np.zeros(1, dtype=np.int64), batch_size=1, context=4)
