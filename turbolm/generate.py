"""Sampling from a language model: temperature, top-k, top-p (nucleus), seeds, streaming.

``generate_tokens`` works with any model that has the turbolm model interface
(``init_state``, ``step``, ``config.vocab_size``, optional ``max_context``):

* The prompt is run in one ``step`` call (prefill), then one token per call.
* Models with a context limit (``max_context``: the Transformer) see a sliding window of the
  last ``max_context`` tokens: a longer prompt is cropped to its end, and once the window is
  full every new token rebuilds the state from the last ``max_context`` tokens (positions
  shift, so cached keys cannot be reused). Each token then costs a full forward over the
  window, and the result equals ``model(ids[-context:])`` at every step (nanoGPT semantics).
* An empty prompt starts from ``bos_id`` (e.g. the tokenizer's end-of-text id), which is not
  yielded; without ``bos_id`` an empty prompt is an ``InputError``.
* ``stop_id`` ends the stream when sampled; it is not yielded.
* The model runs under ``torch.no_grad()`` and in eval mode; each module's train/eval flag
  and the caller's grad mode are restored around every model call, so the caller sees no
  change between tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from turbolm.errors import DTypeError, InputError, ShapeError


def _check_sampling(temperature, top_k, top_p) -> None:
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise InputError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (
        not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1
    ):
        raise InputError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties at the k-th value are kept)."""
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))  # (B, V)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V), 0 for the most likely token
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # (B, V)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from ``logits`` (B, V) -> (B,) int64 on ``logits``' device.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by ``temperature``,
    filtered to the ``top_k`` largest, then to the nucleus of mass ``top_p``, and sampled
    with ``generator`` (sampling runs on the generator's device).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise DTypeError("logits must be a floating point tensor")
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ShapeError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = _filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    return ids.squeeze(-1).to(logits.device)  # (B,)


def _check_id(name: str, value, vocab_size: int | None) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{name} must be a token id (int >= 0), got {value!r}")
    if vocab_size is not None and value >= vocab_size:
        raise InputError(f"{name}={value} is out of range for vocab_size={vocab_size}")
    return value


def _call_in_eval(model: nn.Module, fn, *args):
    """``fn(*args)`` with every module of ``model`` in eval mode; restores each module's flag.

    This runs once per generated token, so an already-evaluating model costs one walk over
    its modules, and modules in training mode get their flag set directly rather than through
    the recursive ``eval()``, unless one of them overrides ``train()`` (then ``eval()`` runs).
    """
    modes = [(m, m.training) for m in model.modules()]
    training = [m for m, mode in modes if mode]
    if not training:
        return fn(*args)
    if any(type(m).train is not nn.Module.train for m in training):
        model.eval()
    else:
        for module in training:
            module.training = False
    try:
        return fn(*args)
    finally:
        for module, mode in modes:
            if module.training != mode:
                module.training = mode


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_id: int | None = None,
    bos_id: int | None = None,
) -> Iterator[int]:
    """Stream up to ``max_new_tokens`` sampled token ids after ``prompt_ids``.

    Arguments are validated now (``InputError``); tokens are computed as the iterator is
    consumed. ``seed`` makes sampling reproducible (a ``torch.Generator`` on the model's
    device); ``None`` uses torch's global generator. See the module docstring for context
    overflow, empty prompts and ``stop_id``.
    """
    for attr in ("init_state", "step"):
        if not callable(getattr(model, attr, None)):
            raise InputError(f"model must have the turbolm model interface (no {attr}())")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1:
            raise ShapeError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    ids = [_check_id(f"prompt_ids[{i}]", t, vocab_size) for i, t in enumerate(prompt_ids)]
    if bos_id is not None:
        bos_id = _check_id("bos_id", bos_id, vocab_size)
    if not ids:
        if bos_id is None:
            raise InputError("prompt_ids is empty: pass bos_id (e.g. the end-of-text id)")
        ids = [bos_id]
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    if stop_id is not None:
        stop_id = _check_id("stop_id", stop_id, vocab_size)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InputError(f"seed must be None or an int, got {seed!r}")
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
    return _stream(model, ids, max_new_tokens, sampling, stop_id, param.device)


@torch.no_grad()  # on a generator function: grad is off only while the generator runs
def _stream(model, ids, max_new_tokens, sampling, stop_id, device) -> Iterator[int]:
    limit = getattr(model, "max_context", None)

    def prefill(tokens: list[int]):
        state = _call_in_eval(model, model.init_state, 1)
        idx = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, t)
        return _call_in_eval(model, model.step, idx, state)

    window = ids[-limit:] if limit else ids  # what the state holds
    logits, state = prefill(window)  # logits (1, t, V)
    for n in range(max_new_tokens):
        token = int(sample_next(logits[:, -1, :], **sampling).item())
        if token == stop_id:
            return
        yield token
        if n + 1 == max_new_tokens:
            return
        if limit is not None and len(window) == limit:
            window = window[1:] + [token]
            logits, state = prefill(window)  # full window: rebuild (positions shifted)
            continue
        if limit is not None:
            window.append(token)
        idx = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
        logits, state = _call_in_eval(model, model.step, idx, state)
