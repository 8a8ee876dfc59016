"""Run an existing PyTorch or Hugging Face model on turbolm's kernels, in place.

>>> from turbolm.patching import apply_turbolm, revert_turbolm
>>> report = apply_turbolm(model)   # any nn.Module; transformers models included
>>> print(report)                   # what was patched, what was left alone and why
>>> revert_turbolm(model)           # back to the original modules

What is patched (each kind can be turned off: ``norm=False``, ``rnn=False``,
``attention=False``):

* **norm**: ``torch.nn.LayerNorm`` / ``RMSNorm`` -> ``turbolm.nn.LayerNorm`` / ``RMSNorm``, and
  the RMSNorm classes of ``transformers`` families (``LlamaRMSNorm``, ``GemmaRMSNorm``, ...;
  see :mod:`turbolm.patching.hf`).
* **rnn**: ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` and their cells -> the ``turbolm.nn`` twins.
* **attention**: ``torch.nn.MultiheadAttention`` -> ``turbolm.nn.MultiheadAttention`` (where
  that module exists), and, for a ``transformers`` model, its attention function
  (``attn_implementation="turbolm"``).
* **loss** (off by default: ``loss=True``): a ``transformers`` causal LM's training forward
  (labels given, gradients on) computes its loss with the fused linear cross-entropy and
  returns ``logits=None`` instead of the (batch, seq, vocab) logits; see
  :mod:`turbolm.patching.hf_loss`.

Patching changes no parameter, buffer or ``state_dict`` key: a module keeps its identity and
its parameters, and only its class (for ``transformers`` models, also the attention-function
name) changes, so an optimizer created before patching keeps working and checkpoints stay
loadable by the unpatched model. Which backend the patched modules run is chosen as for any
turbolm op (``turbolm.use_backend``, ``TURBOLM_BACKEND``, else ``auto``). Patching twice is a
no-op; ``revert_turbolm`` undoes everything.

The ``apply_turbolm_to_<family>`` functions do the same after checking
``model.config.model_type``, for the families the test suite covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbolm.errors import InputError
from turbolm.patching import hf, hf_loss
from turbolm.patching.torch_modules import patch_torch_modules, restore_class

KINDS = ("norm", "rnn", "attention", "loss")

# model_type values of the transformers families the tests cover.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")

# The attention implementation a patched transformers model had before (kept on the model).
_ATTENTION_BEFORE_ATTR = "_turbolm_attention_before"


@dataclass
class PatchReport:
    """What :func:`apply_turbolm` did.

    ``patched``: kind -> [(module name, original class / setting)]; ``skipped``:
    [(module name, reason)]; ``attention_before``: a transformers model's previous
    ``attn_implementation`` when its attention was switched, else None.
    """

    patched: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: {kind: [] for kind in KINDS}
    )
    skipped: list[tuple[str, str]] = field(default_factory=list)
    attention_before: str | None = None

    def add_patched(self, kind: str, name: str, original: str) -> None:
        self.patched[kind].append((name, original))

    def add_skipped(self, name: str, reason: str) -> None:
        self.skipped.append((name, reason))

    def count(self, kind: str | None = None) -> int:
        """How many modules (or attention switches) of ``kind`` (None: all) were patched."""
        kinds = KINDS if kind is None else (kind,)
        return sum(len(self.patched[k]) for k in kinds)

    def __str__(self) -> str:
        lines = [
            "turbolm patch: "
            + ", ".join(f"{kind} {len(self.patched[kind])}" for kind in KINDS)
            + f", skipped {len(self.skipped)}"
        ]
        for kind in KINDS:
            for name, original in self.patched[kind]:
                lines.append(f"  {kind:9} {name} ({original})")
        for name, reason in self.skipped:
            lines.append(f"  skipped   {name}: {reason}")
        return "\n".join(lines)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def apply_turbolm(
    model: torch.nn.Module,
    *,
    norm: bool = True,
    rnn: bool = True,
    attention: bool = True,
    loss: bool = False,
) -> PatchReport:
    """Patch ``model`` in place (see the module docstring); returns a :class:`PatchReport`."""
    _check_model(model)
    options = {"norm": norm, "rnn": rnn, "attention": attention, "loss": loss}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    kinds = {kind for kind, wanted in options.items() if wanted}
    report = PatchReport()
    patch_torch_modules(model, kinds, report)
    hf_models = hf.outermost_hf_models(model)
    if hf_models and norm:
        hf.patch_rmsnorms(model, report)
    for name, hf_model in hf_models if attention else ():
        before = hf.patch_attention(hf_model, report, name)
        if before is not None:
            hf_model.__dict__[_ATTENTION_BEFORE_ATTR] = hf.AttentionSwitch(before)
            report.attention_before = before
    for name, hf_model in hf_models if loss else ():
        hf_loss.patch_loss(hf_model, report, name.replace("<attention>", "<loss>"))
    return report


def revert_turbolm(model: torch.nn.Module) -> int:
    """Undo :func:`apply_turbolm` on ``model``; returns how many modules were restored
    (plus one when a transformers model's attention function was switched back)."""
    _check_model(model)
    restored = 0
    for module in model.modules():
        restored += restore_class(module)
        restored += hf_loss.revert_loss(module)
        switch = module.__dict__.pop(_ATTENTION_BEFORE_ATTR, None)
        if switch is not None:
            hf.revert_attention(module, switch.before)
            restored += 1
    return restored


def _family_patcher(family: str):
    def apply(model: torch.nn.Module, **options) -> PatchReport:
        _check_model(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type != family:
            raise InputError(
                f"apply_turbolm_to_{family} expects a transformers {family!r} model "
                f"(config.model_type), got {model_type!r}; apply_turbolm(model) patches any model"
            )
        return apply_turbolm(model, **options)

    apply.__name__ = apply.__qualname__ = f"apply_turbolm_to_{family}"
    apply.__doc__ = (
        f"apply_turbolm for a transformers {family!r} model (checks config.model_type); "
        "options: norm, rnn, attention, loss."
    )
    return apply


apply_turbolm_to_llama = _family_patcher("llama")
apply_turbolm_to_mistral = _family_patcher("mistral")
apply_turbolm_to_qwen2 = _family_patcher("qwen2")
apply_turbolm_to_qwen3 = _family_patcher("qwen3")
apply_turbolm_to_gemma = _family_patcher("gemma")
apply_turbolm_to_phi3 = _family_patcher("phi3")
apply_turbolm_to_gpt2 = _family_patcher("gpt2")

__all__ = [
    "FAMILIES",
    "KINDS",
    "PatchReport",
    "apply_turbolm",
    "revert_turbolm",
    *(f"apply_turbolm_to_{family}" for family in FAMILIES),
]
