"""turbolm.generate: sampling filters, seeds, streaming, context overflow, argument checks."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from turbolm.errors import DTypeError, InputError, ShapeError
from turbolm.generate import generate_tokens, sample_next
from turbolm.models import RNNLM, RNNConfig, TransformerConfig, TransformerLM

V = 37


@pytest.fixture(autouse=True)
def rnn_modules(monkeypatch):
    """Use torch.nn's recurrent modules only while turbolm.nn.rnn cannot be imported."""
    try:
        import turbolm.nn.rnn  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("turbolm.nn.rnn")
        stand_in.LSTM, stand_in.GRU, stand_in.RNN = torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN
        monkeypatch.setitem(sys.modules, "turbolm.nn.rnn", stand_in)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Larger random weights, so the next-token distributions are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=V, context=12, n_layer=2, n_head=2, d_model=16)
    return _perturb(TransformerLM(config))


@pytest.fixture
def rnn():
    torch.manual_seed(0)
    return _perturb(RNNLM(RNNConfig(vocab_size=V, n_layer=1, d_embed=16, d_hidden=16)))


def _greedy_by_forward(model, prompt, n):
    """nanoGPT's loop: full forward over the last `context` tokens for every new token."""
    ids = list(prompt)
    limit = getattr(model, "max_context", None)
    with torch.no_grad():
        for _ in range(n):
            window = ids[-limit:] if limit else ids
            logits, _ = model(torch.tensor([window]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


# ---------------------------------------------------------------------------------------------
# sample_next


def test_sample_next_greedy_and_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen) * 3
    greedy = logits.argmax(-1)
    assert sample_next(logits, temperature=0).dtype == torch.int64
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    for _ in range(5):
        assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen), greedy)
        assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=gen), greedy)


def test_sample_next_top_k_and_top_p_support():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, -1)
    top2 = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...
    nucleus = sample_next(logits, 1.0, top_p=0.8, generator=gen)  # 0.64 < 0.8 <= 0.88
    assert set(nucleus.tolist()) == {0, 1}
    frac0 = (nucleus == 0).float().mean().item()
    assert abs(frac0 - (probs[0] / probs[:2].sum()).item()) < 0.05
    everything = sample_next(logits, 1.0, generator=gen)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


def test_sample_next_seed_reproducible_and_temperature():
    logits = torch.randn(4, 100)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    cold = sample_next(logits, 1e-4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(cold, logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
    ],
)
def test_sample_next_argument_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        sample_next(torch.randn(1, 5), **kwargs)


def test_sample_next_input_errors():
    with pytest.raises(ShapeError):
        sample_next(torch.randn(5), 0.0)
    with pytest.raises(DTypeError):
        sample_next(torch.zeros(1, 5, dtype=torch.long), 0.0)


# ---------------------------------------------------------------------------------------------
# generate_tokens


@pytest.mark.parametrize("which", ["transformer", "rnn"])
def test_greedy_is_deterministic_and_matches_forward(which, request):
    model = request.getfixturevalue(which)
    prompt = [1, 2, 3, 4]
    a = list(generate_tokens(model, prompt, 6, temperature=0))
    b = list(generate_tokens(model, prompt, 6, temperature=0))
    assert a == b == _greedy_by_forward(model, prompt, 6)
    assert all(isinstance(t, int) and 0 <= t < V for t in a)


@pytest.mark.parametrize("which", ["transformer", "rnn"])
def test_seed_reproducibility(which, request):
    model = request.getfixturevalue(which)
    runs = [list(generate_tokens(model, [5, 6], 10, temperature=1.0, seed=s)) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_1_and_tiny_top_p_equal_greedy(transformer):
    greedy = list(generate_tokens(transformer, [3, 1], 8, temperature=0))
    assert list(generate_tokens(transformer, [3, 1], 8, temperature=1.5, top_k=1, seed=0)) == greedy
    assert (
        list(generate_tokens(transformer, [3, 1], 8, temperature=1.5, top_p=1e-9, seed=0)) == greedy
    )


def test_max_new_tokens_and_stop_id(transformer):
    assert list(generate_tokens(transformer, [1], 0)) == []
    out = list(generate_tokens(transformer, [1], 7, temperature=1.0, seed=3))
    assert len(out) == 7
    stopped = list(generate_tokens(transformer, [1], 7, temperature=1.0, seed=3, stop_id=out[3]))
    first_stop = out.index(out[3])
    assert stopped == out[:first_stop]


def test_context_overflow_slides_the_window(transformer):
    """Prompt near the context limit and many new tokens: equals cropping to the last
    `context` tokens before each prediction."""
    assert transformer.config.context == 12
    prompt = [i % V for i in range(3, 13)]  # 10 of 12
    out = list(generate_tokens(transformer, prompt, 9, temperature=0))
    assert out == _greedy_by_forward(transformer, prompt, 9)
    long_prompt = [i % V for i in range(30)]  # longer than context: cropped to its end
    out = list(generate_tokens(transformer, long_prompt, 3, temperature=0))
    assert out == _greedy_by_forward(transformer, long_prompt, 3)


def test_empty_prompt_needs_bos_id(transformer):
    with pytest.raises(InputError, match="bos_id"):
        generate_tokens(transformer, [], 3)
    out = list(generate_tokens(transformer, [], 3, temperature=0, bos_id=0))
    assert out == list(generate_tokens(transformer, [0], 3, temperature=0))


def test_restores_train_mode_and_grad_mode(transformer):
    transformer.train()
    transformer.blocks[0].eval()  # mixed modes survive too
    stream = generate_tokens(transformer, [1, 2], 3, temperature=1.0, seed=0)
    next(stream)
    assert transformer.training and not transformer.blocks[0].training
    assert torch.is_grad_enabled()
    assert len(list(stream)) == 2
    assert transformer.training and transformer.blocks[1].training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt_ids=[1, V]), r"prompt_ids\[1\]"),
        (dict(prompt_ids=[1, -2]), r"prompt_ids\[1\]"),
        (dict(stop_id=V), "stop_id"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_generate_argument_errors(transformer, kwargs, match):
    args = {"prompt_ids": [1, 2], "max_new_tokens": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        generate_tokens(transformer, **args)  # raised at the call, before iteration


def test_restores_modes_of_modules_that_override_train(transformer):
    calls = []

    class Tracked(torch.nn.Identity):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    transformer.extra = Tracked()  # not used by forward; its train() must still be honoured
    transformer.train()
    calls.clear()
    assert len(list(generate_tokens(transformer, [1, 2], 2, temperature=0))) == 2
    assert False in calls  # eval() ran, through the override
    assert transformer.training and transformer.extra.training
