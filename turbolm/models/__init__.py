"""Language models and the dict <-> model mapping used by configs and checkpoints.

``build_model({"arch": "transformer", "vocab_size": 512, ...})`` builds a model;
``model_config_dict(model)`` gives back the dict (with ``"arch"``) that rebuilds it.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from turbolm.errors import ConfigError
from turbolm.models.rnn import RNNLM, RNNConfig
from turbolm.models.transformer import TransformerConfig, TransformerLM

ARCHS: dict[str, tuple[type, type]] = {
    "transformer": (TransformerLM, TransformerConfig),
    "rnn": (RNNLM, RNNConfig),
}


def build_model(kwargs: dict) -> nn.Module:
    """Build the model named by ``kwargs["arch"]`` from the remaining keys (config fields).

    Raises ``ConfigError`` naming a missing or unknown ``arch``, unknown fields, missing
    required fields (``vocab_size``) or invalid values.
    """
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model config must be a dict, got {type(kwargs).__name__}")
    fields = dict(kwargs)
    arch = fields.pop("arch", None)
    if arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {tuple(ARCHS)}, got {arch!r}")
    model_cls, config_cls = ARCHS[arch]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(
            f"unknown model field(s) for arch={arch!r}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.name not in fields
    )
    if missing:
        raise ConfigError(f"missing model field(s) for arch={arch!r}: {', '.join(missing)}")
    return model_cls(config_cls(**fields))


def model_config_dict(model: nn.Module) -> dict:
    """The dict ``build_model`` takes to rebuild ``model``: ``{"arch": ..., **fields}``."""
    arch = getattr(model, "arch", None)
    if arch not in ARCHS or not dataclasses.is_dataclass(getattr(model, "config", None)):
        raise ConfigError(f"{type(model).__name__} is not a turbolm model")
    return {"arch": arch, **dataclasses.asdict(model.config)}


__all__ = [
    "ARCHS",
    "RNNConfig",
    "RNNLM",
    "TransformerConfig",
    "TransformerLM",
    "build_model",
    "model_config_dict",
]
