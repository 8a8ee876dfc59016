"""Swap the torch.nn modules of a model for their ``turbolm.nn`` twins, in place.

Each ``turbolm.nn`` module is a subclass of its torch.nn twin that keeps the same attributes,
parameters and ``state_dict`` keys and only replaces ``forward``. So a module is patched by
switching its ``__class__``: the module object, its parameters (and any optimizer state keyed
on them), hooks, device and dtype all stay as they are, and reverting switches the class back.

Only modules whose type is exactly the torch.nn class are swapped. A user subclass of, say,
``nn.LayerNorm`` may have its own ``forward``; it is left alone and reported as skipped.
"""

from __future__ import annotations

import warnings

import torch

import turbolm.nn as tnn

# The attribute a patched module keeps its original class in (in its __dict__, not a buffer).
ORIGINAL_CLASS_ATTR = "_turbolm_original_class"


def twins() -> dict[str, dict[type, type]]:
    """Kind ("norm", "rnn", "attention") -> {torch.nn class: turbolm.nn class}."""
    table = {
        "norm": {torch.nn.LayerNorm: tnn.LayerNorm, torch.nn.RMSNorm: tnn.RMSNorm},
        "rnn": {
            torch.nn.LSTM: tnn.LSTM,
            torch.nn.GRU: tnn.GRU,
            torch.nn.RNN: tnn.RNN,
            torch.nn.LSTMCell: tnn.LSTMCell,
            torch.nn.GRUCell: tnn.GRUCell,
            torch.nn.RNNCell: tnn.RNNCell,
        },
        "attention": {},
    }
    mha = getattr(tnn, "MultiheadAttention", None)
    if mha is not None:
        table["attention"][torch.nn.MultiheadAttention] = mha
    return table


def swap_class(module: torch.nn.Module, new_class: type) -> None:
    """Make ``module`` an instance of ``new_class`` (a subclass of its class), remembering the
    original class (and the one installed) for :func:`restore_class`."""
    module.__dict__[ORIGINAL_CLASS_ATTR] = (type(module), new_class)
    module.__class__ = new_class


def restore_class(module: torch.nn.Module) -> bool:
    """Undo :func:`swap_class`; False if ``module`` was not swapped.

    When something switched the class again after turbolm did (``torch.nn.utils.parametrize``
    and FSDP2 put their own class on top), putting the original class back would drop that
    layer, so the module is left as it is, with a warning.
    """
    record = module.__dict__.get(ORIGINAL_CLASS_ATTR)
    if record is None:
        return False
    original, installed = record
    if type(module) is not installed:
        warnings.warn(
            f"turbolm: not reverting a {installed.__name__}: its class was changed again after "
            f"patching (now {type(module).__qualname__}); undo that first",
            stacklevel=3,
        )
        return False
    del module.__dict__[ORIGINAL_CLASS_ATTR]
    module.__class__ = original
    return True


def is_swapped(module: torch.nn.Module) -> bool:
    return ORIGINAL_CLASS_ATTR in module.__dict__


def patch_torch_modules(model: torch.nn.Module, kinds: set[str], report) -> None:
    """Swap every exact torch.nn norm / RNN / attention module of ``model`` whose kind is in
    ``kinds``; record what was done (and what was not, with why) in ``report``."""
    table = twins()
    for name, module in model.named_modules():
        if is_swapped(module):
            continue  # patched before: patching twice is a no-op
        for kind, mapping in table.items():
            twin = mapping.get(type(module))
            if twin is not None:
                if kind in kinds:
                    swap_class(module, twin)
                    report.add_patched(kind, name or "<root>", type(module).__name__)
                break
            base = next((c for c in mapping if isinstance(module, c)), None)
            if (
                base is not None
                and kind in kinds
                and not isinstance(module, tuple(mapping.values()))
            ):
                report.add_skipped(
                    name or "<root>",
                    f"{type(module).__qualname__} subclasses torch.nn.{base.__name__} with its "
                    "own class; only exact torch.nn modules are swapped",
                )
                break
