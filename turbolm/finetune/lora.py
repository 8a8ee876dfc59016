"""LoRA adapters for turbolm models through ``peft``: which layers, wrapping, adapter folders.

What can be adapted (``lora.target``: group names, ``auto``, or module / parameter names):

============  =====================================================  ==========================
model         group -> layers                                         peft mechanism
============  =====================================================  ==========================
Transformer   ``attn``  -> every block's ``attn.qkv``, ``attn.proj``   LoRA on ``nn.Linear``
              ``mlp``   -> every block's ``mlp.fc``, ``mlp.proj``      LoRA on ``nn.Linear``
              ``embed`` -> ``tok_emb``; ``head`` -> ``lm_head``         LoRA on Embedding / Linear
              ``auto``  =  attn, mlp
RNN           ``rnn``   -> ``rnn.weight_ih_l*``, ``rnn.weight_hh_l*``   ``target_parameters``
              ``proj``  -> ``proj`` (tied models with d_embed != d_hidden)  LoRA on ``nn.Linear``
              ``embed`` -> ``embed``; ``head`` -> ``head``              LoRA on Embedding / Linear
              ``auto``  =  rnn (+ proj when the model has one)
============  =====================================================  ==========================

peft has no LoRA layer for ``nn.LSTM`` / ``nn.GRU`` modules, so ``target_modules`` cannot name
them. Their weight matrices are adapted with peft's ``target_parameters`` instead (LoRA on an
``nn.Parameter`` through ``torch.nn.utils.parametrize``, peft >= 0.17): the adapted matrix
``W + B A`` is recomputed on every access, and turbolm's drop-in recurrent modules re-read
their weights on every forward (``_update_flat_weights``), so the recurrence sees it, for
every op backend. Recurrent biases and norm gains are never adapted (1-D).

Tied embeddings (``tie_embeddings``): LoRA on ``embed`` or ``head`` adapts one use of the
shared matrix only. Training and ``base + adapter`` inference are exact; merging has to untie
(the merged checkpoint gets ``tie_embeddings: false`` and both matrices). An RNN whose tied
head sits behind ``proj`` (d_embed != d_hidden) cannot be untied without changing its
architecture, so adapting its ``embed`` / ``head`` is refused up front.

An adapter folder is what ``peft`` writes (``adapter_config.json``, ``adapter_model.safetensors``)
plus ``turbolm_adapter.json`` (the task, labels, pooling and the base model's ``build_model``
kwargs, used to refuse a base it does not fit) and a copy of the base's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from turbolm.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "turbolm_adapter.json"
ADAPTER_SUBDIR = "adapter"  # inside a fine-tuning run folder

_MODULE_GROUPS = {
    "transformer": {
        "attn": r"blocks\.\d+\.attn\.(qkv|proj)",
        "mlp": r"blocks\.\d+\.mlp\.(fc|proj)",
        "embed": r"tok_emb",
        "head": r"lm_head",
    },
    "rnn": {"proj": r"proj", "embed": r"embed", "head": r"head"},
}
_PARAM_GROUPS = {"rnn": {"rnn": r"rnn\.weight_(ih|hh)_l\d+"}}
_AUTO = {"transformer": ["attn", "mlp"], "rnn": ["rnn", "proj"]}
_TIED = {"transformer": ("tok_emb", "lm_head"), "rnn": ("embed", "head")}


@dataclass
class Targets:
    """Resolved LoRA targets of a language model (names relative to the LM)."""

    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # spec -> what it selected

    def describe(self) -> str:
        return "; ".join(f"{spec}: {', '.join(names)}" for spec, names in self.groups.items())


def _arch(lm: nn.Module) -> str:
    arch = getattr(lm, "arch", None)
    if arch not in _MODULE_GROUPS:
        raise ConfigError(f"LoRA targets are defined for turbolm models, got {type(lm).__name__}")
    return arch


def _groups_help(arch: str) -> str:
    groups = [*_MODULE_GROUPS[arch], *_PARAM_GROUPS.get(arch, {})]
    example = "blocks.0.attn.qkv" if arch == "transformer" else "rnn.weight_hh_l0"
    return (
        f"groups for {arch} models: {', '.join(sorted(groups))} or auto; or module / parameter "
        f"names such as {example}"
    )


def resolve_targets(lm: nn.Module, specs: list[str]) -> Targets:
    """Turn ``lora.target`` entries into module and parameter names of ``lm``.

    Raises ``ConfigError`` for an entry that selects nothing, names a layer type LoRA cannot
    adapt, or adapts a tied matrix that could not be merged back.
    """
    arch = _arch(lm)
    modules = dict(lm.named_modules())
    params = dict(lm.named_parameters(remove_duplicate=False))
    expanded: list[str] = []
    for spec in specs:
        spec = spec.strip()
        if spec == "auto":
            expanded += [g for g in _AUTO[arch] if g not in expanded]
        elif spec and spec not in expanded:
            expanded.append(spec)
    out = Targets()
    for spec in expanded:
        chosen_m: list[str] = []
        chosen_p: list[str] = []
        if spec in _MODULE_GROUPS[arch]:
            pattern = re.compile(_MODULE_GROUPS[arch][spec])
            chosen_m = [n for n in modules if pattern.fullmatch(n)]
        elif spec in _PARAM_GROUPS.get(arch, {}):
            pattern = re.compile(_PARAM_GROUPS[arch][spec])
            chosen_p = [n for n in params if pattern.fullmatch(n)]
        elif spec in params and not isinstance(
            modules.get(spec.rpartition(".")[0]), (nn.Linear, nn.Embedding)
        ):
            if params[spec].dim() != 2:
                raise ConfigError(
                    f"lora.target {spec!r} is a {params[spec].dim()}-D parameter; LoRA adapts "
                    "matrices (2-D)"
                )
            chosen_p = [spec]
        else:
            chosen_m = [n for n in modules if n and (n == spec or n.endswith("." + spec))]
            for n in chosen_m:
                if not isinstance(modules[n], (nn.Linear, nn.Embedding)):
                    raise ConfigError(
                        f"lora.target {spec!r} selects {n}, a {type(modules[n]).__name__}: "
                        "LoRA adapts Linear and Embedding layers"
                        + (" (and recurrent weights: use 'rnn')" if arch == "rnn" else "")
                    )
        if not chosen_m and not chosen_p:
            if spec == "proj" and arch == "rnn" and "auto" in specs:
                continue  # auto: this RNN has no projection layer
            raise ConfigError(
                f"lora.target {spec!r} names no module of this {type(lm).__name__}; "
                + _groups_help(arch)
            )
        out.groups[spec] = chosen_m + chosen_p
        out.modules += [n for n in chosen_m if n not in out.modules]
        out.parameters += [n for n in chosen_p if n not in out.parameters]
    _check_tied(lm, arch, out.modules)
    return out


def touches_tied(lm: nn.Module, module_names: list[str]) -> bool:
    """Whether any named module is the tied embedding or LM head of ``lm``."""
    arch = getattr(lm, "arch", None)
    if arch not in _TIED or not getattr(lm.config, "tie_embeddings", False):
        return False
    return any(n in _TIED[arch] for n in module_names)


def _check_tied(lm: nn.Module, arch: str, module_names: list[str]) -> None:
    if arch == "rnn" and touches_tied(lm, module_names) and lm.config.projects:
        raise ConfigError(
            "lora.target adapts the tied embedding / output layer of an RNNLM with "
            f"d_embed ({lm.config.d_embed}) != d_hidden ({lm.config.d_hidden}); a merged model "
            "could not keep them tied nor untie them without changing the architecture: "
            "use lora.target=rnn,proj or full fine-tuning (lora.r=0)"
        )


def lora_config(
    targets: Targets,
    r: int,
    alpha: float,
    dropout: float,
    prefix: str = "",
    modules_to_save: list[str] | None = None,
):
    """A ``peft.LoraConfig`` for the resolved targets (names prefixed with ``prefix``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[prefix + n for n in targets.modules],
        target_parameters=[prefix + n for n in targets.parameters] or None,
        modules_to_save=modules_to_save,
        bias="none",
    )


def add_lora(model: nn.Module, config, base_path: str | None = None) -> nn.Module:
    """``peft.get_peft_model``: LoRA layers injected, every base weight frozen. ``base_path``
    is recorded as ``base_model_name_or_path`` in the adapter config (provenance only)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if base_path is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_path
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ------------------------------------------------------------------------------ adapter folders


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter folder: ``path`` itself or ``path/adapter`` (a fine-tuning run folder)."""
    p = Path(path)
    for cand in (p, p / ADAPTER_SUBDIR):
        if (cand / ADAPTER_CONFIG).is_file():
            if not (cand / ADAPTER_WEIGHTS).is_file():
                raise CheckpointError(f"adapter {cand}: {ADAPTER_WEIGHTS} is missing")
            return cand
    if not p.exists():
        raise CheckpointError(f"adapter path {p} does not exist")
    raise CheckpointError(
        f"{p} is not an adapter folder (no {ADAPTER_CONFIG}, nor {ADAPTER_SUBDIR}/{ADAPTER_CONFIG})"
    )


def read_adapter_meta(adapter_dir: Path) -> dict:
    """``turbolm_adapter.json`` of an adapter folder; a plain peft adapter gets an LM entry."""
    p = adapter_dir / ADAPTER_META
    if not p.is_file():
        return {"task": {"type": "lm"}}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"adapter {adapter_dir}: unreadable {ADAPTER_META} ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), dict):
        raise CheckpointError(f"adapter {adapter_dir}: {ADAPTER_META} has no 'task' entry")
    return meta


def check_base_fits(adapter_dir: Path, meta: dict, base_kwargs: dict) -> None:
    """Refuse a base whose architecture differs from the one the adapter was trained on."""
    want = (meta.get("base") or {}).get("model")
    if not isinstance(want, dict):
        return  # a plain peft adapter: the shape check in load_adapter still applies
    diffs = [
        k
        for k in sorted(set(want) | set(base_kwargs))
        if k != "dropout" and want.get(k) != base_kwargs.get(k)
    ]
    if diffs:
        shown = ", ".join(
            f"{k}={want.get(k)!r} (adapter) vs {base_kwargs.get(k)!r} (base)" for k in diffs[:4]
        )
        raise CheckpointError(
            f"adapter {adapter_dir} was trained for a different base model: {shown}"
        )


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
    r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))"
)


def load_adapter(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """``PeftModel.from_pretrained(model, adapter_dir)`` with one-line errors."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except RuntimeError as e:
        m = _SIZE_MISMATCH.search(str(e))
        if m:
            name = m.group(1).removeprefix("base_model.model.").replace(".default", "")
            raise CheckpointError(
                f"adapter {adapter_dir} does not fit this base model: {name} has shape "
                f"{_shape(m.group(2))} in the adapter but {_shape(m.group(3))} in the model"
            ) from None
        raise CheckpointError(f"cannot load adapter {adapter_dir}: {_first_line(e)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot load adapter {adapter_dir}: {_first_line(e)}") from None


def _shape(text: str) -> str:
    """``torch.Size([8, 32])`` -> ``(8, 32)``."""
    return "(" + text.removeprefix("torch.Size([").removesuffix("])") + ")"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def adapter_target_modules(adapter_dir: Path) -> list[str] | str:
    """``target_modules`` of an adapter's config: a list of names, or a regex string."""
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"adapter {adapter_dir}: unreadable {ADAPTER_CONFIG} ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"adapter {adapter_dir}: {ADAPTER_CONFIG} is not a JSON object")
    targets = cfg.get("target_modules") or []
    return targets if isinstance(targets, str) else list(targets)


def untied_copy(lm: nn.Module) -> tuple[nn.Module, dict]:
    """The same model with ``tie_embeddings=False`` (both matrices equal), and its kwargs."""
    from turbolm.models import build_model, model_config_dict

    kwargs = {**model_config_dict(lm), "tie_embeddings": False}
    if kwargs["arch"] == "rnn" and lm.config.projects:
        raise CheckpointError(
            "cannot untie an RNNLM whose tied output layer sits behind proj (d_embed != d_hidden)"
        )
    copy = build_model(kwargs)
    copy.load_state_dict(lm.state_dict())  # the tied tensor is copied into both matrices
    return copy.to(next(lm.parameters()).device).train(lm.training), kwargs


def needs_untie(lm: nn.Module, adapter_dir: Path, prefix: str = "") -> bool:
    """Whether merging this adapter into ``lm`` (a sub-module named ``prefix`` of the peft
    base, e.g. ``"lm."`` in a classifier) must untie its embeddings first."""
    targets = adapter_target_modules(adapter_dir)

    def selected(full: str) -> bool:
        if isinstance(targets, str):  # peft: a string is a regex matched against the full name
            return re.fullmatch(targets, full) is not None
        return any(full == t or full.endswith("." + t) for t in targets)

    return touches_tied(lm, [n for n, _ in lm.named_modules() if n and selected(prefix + n)])


def save_adapter(peft_model: nn.Module, out: Path, meta: dict, tokenizer_path: Path | None) -> Path:
    """Write a peft adapter folder + ``turbolm_adapter.json`` (+ tokenizer) atomically: into a
    hidden sibling folder first, renamed to ``out`` when complete."""
    import peft

    from turbolm.train.checkpoint import _turbolm_version

    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_embedding_layers=False: never copy whole base embedding matrices into the adapter
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    meta = {**meta, "turbolm_version": _turbolm_version(), "peft_version": peft.__version__}
    (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    aside = None
    if out.exists():
        aside = out.parent / f".old-{out.name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(out, aside)
    os.rename(tmp, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out
