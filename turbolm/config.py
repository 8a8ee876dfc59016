"""Run configuration: nested dataclasses, YAML files, ``key=value`` overrides, validation.

A run is described by three sections::

    data:  where the prepared tokens live and how to build them (``DataConfig``)
    model: the architecture (``ModelConfig``); ``vocab_size`` is *not* here, it comes from data
    train: optimisation, evaluation, checkpointing, logging (``TrainConfig``)

Every field has a default; the defaults are the default run (a small Transformer trained on
CPU in a few minutes on the embedded stdlib corpus). ``load_config(path, overrides)`` reads a
YAML file, applies overrides such as ``train.lr=3e-4`` or just ``lr=3e-4`` (un-sectioned keys
are accepted when only one section has them), coerces every value to its field's type and
validates the result. All failures raise ``ConfigError`` naming the key and the rule.

The field annotations drive parsing: ``int``, ``float``, ``bool``, ``str``, ``list[str]``,
``X | None`` and ``Literal[...]`` (a choice) are understood, so adding a field is one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from turbolm.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "validate",
    "config_to_dict",
    "config_from_dict",
    "dump_yaml",
    "model_kwargs",
]


@dataclass
class DataConfig:
    """Corpus, tokenizer and the prepared-data folder."""

    dir: str = "data_cache/stdlib"  # prepared data folder (train.bin, val.bin, meta.json, ...)
    sources: list[str] = field(default_factory=list)  # files/folders/JSONL; empty = embedded
    include: list[str] = field(default_factory=list)  # glob patterns filtering folder contents
    jsonl_field: str = "text"  # which field of a JSONL record holds the text
    vocab_size: int = 4096  # BPE vocabulary size (ignored by the "bytes" tokenizer)
    tokenizer: Literal["bpe", "bytes"] = "bpe"
    val_fraction: float = 0.05  # share of the tokens held out for validation
    max_docs: int | None = None  # cap on documents read (None = all)


@dataclass
class ModelConfig:
    """Architecture. Transformer fields first, then RNN-only fields; ``n_layer``, ``d_model``
    (the RNN's embedding size), ``dropout`` and ``tie_embeddings`` are shared."""

    arch: Literal["transformer", "rnn"] = "transformer"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (plain multi-head); fewer = grouped-query
    d_model: int = 192
    context: int = 128
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_ratio: float = 4.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    pos: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    # RNN only
    cell: Literal["lstm", "gru", "rnn_tanh", "rnn_relu"] = "lstm"
    d_hidden: int = 512
    rnn_layer_norm: bool = False  # LayerNorm-LSTM / -GRU (cell lstm or gru)


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing and logging."""

    out_dir: str = "runs/default"
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto = fp32 on CPU, bf16 on a GPU that supports it
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    eval_every: int = 100
    eval_batches: int = 20
    early_stop_patience: int = 0  # 0 = off; counted in evaluations without improvement
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_tokens: int = 200  # tokens sampled at each evaluation (0 = no sample)
    tensorboard: bool = True
    backend: str = "auto"  # turbolm op backend, as in TURBOLM_BACKEND
    compile: bool = False  # torch.compile the model
    # recompute each Transformer block in backward instead of keeping its activations
    activation_checkpointing: bool = False
    # LM head + loss through the fused linear cross-entropy op (no (tokens, vocab) logits)
    fused_cross_entropy: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); "" = no DeepSpeed. "auto"
    # values in it are filled from this config (see turbolm/train/distributed.py)
    deepspeed: str = ""


@dataclass
class RunConfig:
    """A whole run: ``data``, ``model`` and ``train`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# ---------------------------------------------------------------------------------------------
# Schema introspection
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (``from __future__ import annotations`` makes them
    strings, so ``dataclasses.fields(...).type`` cannot be used directly)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _schema(root: type = RunConfig) -> dict[str, Any]:
    """Map every dotted key (``"train.lr"``) of a two-level config class to its type."""
    keys: dict[str, Any] = {}
    for section, section_type in _field_types(root).items():
        for name, tp in _field_types(section_type).items():
            keys[f"{section}.{name}"] = tp
    return keys


def _suggest(key: str, schema: dict[str, Any]) -> str:
    """A `` (did you mean 'x'?)`` suffix for an unknown key, or ``""`` when nothing is close."""
    leaf = key.rsplit(".", 1)[-1]
    # Right name, wrong (or missing) section: suggest the sections that do have it.
    same_leaf = [k for k in schema if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f" (did you mean {_quoted_list(same_leaf)}?)"
    if "." in key:
        close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    else:
        by_leaf: dict[str, list[str]] = {}
        for k in schema:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        leaves = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)
        close = [k for name in leaves for k in by_leaf[name]]
    return f" (did you mean {_quoted_list(close)}?)" if close else ""


def _suggest_section(name: Any) -> str:
    """Suggestion for an unknown top-level key: a section name, or the section of a field
    written at the top level (``lr:`` -> ``train.lr``)."""
    close = difflib.get_close_matches(str(name), list(SECTIONS), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return _suggest(str(name), _schema())


def _quoted_list(names: list[str]) -> str:
    return " or ".join(f"'{n}'" for n in names)


def _resolve_key(key: str, root: type = RunConfig) -> str:
    """Turn a user key (dotted, or a bare field name) into its dotted form.

    A bare name is accepted when exactly one section has a field of that name.
    """
    schema = _schema(root)
    key = key.strip()
    if key in schema:
        return key
    if "." not in key:
        matches = [k for k in schema if k.split(".", 1)[1] == key]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(
                f"config key '{key}' is ambiguous: it could be {_quoted_list(matches)}; "
                "write the section too"
            )
    raise ConfigError(f"unknown config key '{key}'{_suggest(key, schema)}")


# ---------------------------------------------------------------------------------------------
# Type coercion
# ---------------------------------------------------------------------------------------------


def _optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None`` / ``Optional[X]``, else ``None``."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of strings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _to_int(key: str, tp: Any, value: Any) -> int:
    if isinstance(value, bool):  # bool is an int subclass; `true` is not a layer count
        raise _bad(key, tp, value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
        try:  # "1e3": PyYAML reads exponent numbers without a dot as strings
            value = float(value)
        except ValueError:
            raise _bad(key, tp, value) from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _bad(key, tp, value)


def _to_float(key: str, tp: Any, value: Any) -> float:
    if isinstance(value, bool):
        raise _bad(key, tp, value)
    if isinstance(value, str):
        try:  # "3e-4": PyYAML (YAML 1.1) reads it as a string, Python reads it as a number
            value = float(value.replace("_", ""))
        except ValueError:
            raise _bad(key, tp, value) from None
    if isinstance(value, (int, float)):
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    raise _bad(key, tp, value)


def _to_str(key: str, tp: Any, value: Any) -> str:
    # Numbers are accepted (a folder may be called 2024); bools and containers are not.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _bad(key, tp, value)


def _to_str_list(key: str, tp: Any, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # comma-separated, as typed on a command line
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [_to_str(f"{key}[{i}]", str, item) for i, item in enumerate(value)]
    raise _bad(key, tp, value)


def _to_choice(key: str, tp: Any, value: Any) -> str:
    choices = typing.get_args(tp)
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise _bad(key, tp, value)


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or an override) to the field type ``tp``.

    Raises ``ConfigError`` naming ``key`` and the expected type when it cannot.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return coerce_value(key, value, inner)
    if typing.get_origin(tp) is Literal:
        return _to_choice(key, tp, value)
    if typing.get_origin(tp) is list:
        return _to_str_list(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, tp, value)
    converters = {int: _to_int, float: _to_float, str: _to_str}
    if tp in converters:
        if value is None:
            raise _bad(key, tp, value)
        return converters[tp](key, tp, value)
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")  # schema bug


def _parse_override_value(raw: str, tp: Any) -> Any:
    """Parse the text after ``=`` with YAML, keeping the raw text for string fields (so
    ``data.dir=007`` stays ``"007"`` instead of becoming the integer 7)."""
    try:
        parsed = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        parsed = raw  # not YAML (e.g. "a: b: c"): let the type check judge the raw text
    inner = _optional_inner(tp)
    if tp is str or (inner is str and parsed is not None):
        return parsed if isinstance(parsed, str) else raw.strip()
    return parsed


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_config_text(path: str | Path, label: str = "config file") -> str:
    """Text of a config file; ``ConfigError`` naming ``label`` and the path if it is missing,
    a directory or unreadable (shared by the YAML run config and DeepSpeed JSON configs)."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"{label} {str(p)!r} {what}")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {label} {str(p)!r}: {e}") from e


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    text = read_config_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r}: {_yaml_error_text(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r}: the top level must be a mapping of sections "
            f"(data:, model:, train:), got a {type(data).__name__}"
        )
    return data


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """'invalid YAML at line L, column C: problem' from a PyYAML error."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is not None:
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"invalid YAML: {problem}"


def _apply_mapping(cfg: RunConfig, data: dict[str, Any], where: str) -> None:
    """Set the fields given as ``{section: {field: value}}`` on ``cfg`` (in place)."""
    schema = _schema()
    for section, values in data.items():
        if not isinstance(section, str) or section not in SECTIONS:
            raise ConfigError(f"{where}unknown config key '{section}'{_suggest_section(section)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}config section '{section}' must be a mapping of keys to values, "
                f"got {values!r}"
            )
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in schema:
                raise ConfigError(f"{where}unknown config key '{key}'{_suggest(key, schema)}")
            _set(cfg, key, coerce_value(key, value, schema[key]))


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    section, name = dotted.split(".", 1)
    setattr(getattr(cfg, section), name, value)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings to ``cfg`` in place (later ones win) and return it.

    Keys are dotted (``train.lr``) or bare when unique (``lr``); values are YAML scalars or
    lists (``data.sources=[a.txt,b.txt]`` or ``data.sources=a.txt,b.txt``).
    """
    schema = _schema()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
        raw_key, raw_value = item.split("=", 1)
        if not raw_key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        key = _resolve_key(raw_key)
        value = _parse_override_value(raw_value, schema[key])
        _set(cfg, key, coerce_value(key, value, schema[key]))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated ``RunConfig``: defaults, then the YAML file (if any), then overrides."""
    cfg = RunConfig()
    if path is not None:
        _apply_mapping(cfg, _read_yaml(path), where=f"config file {str(path)!r}: ")
    apply_overrides(cfg, list(overrides or []))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_types(cfg: RunConfig) -> list[str]:
    """Every field holds a value of its declared type (configs built in code skip coercion)."""
    problems = []
    for key, tp in _schema().items():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        try:
            coerced = coerce_value(key, value, tp)
        except ConfigError as e:
            problems.append(str(e))
            continue
        # Coercion may be lenient (str "3" -> 3); in code we want the real type, except
        # int where a float is expected.
        if coerced != value or (type(coerced) is not type(value) and tp is not float):
            problems.append(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return problems


def _rules(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, rule) for every value rule; ``ok`` False means the rule is broken."""
    d, m, t = cfg.data, cfg.model, cfg.train
    rules = [
        ("data.dir", bool(d.dir.strip()), "must not be empty"),
        ("data.jsonl_field", bool(d.jsonl_field.strip()), "must not be empty"),
        ("data.vocab_size", d.vocab_size >= 1, "must be >= 1"),
        (
            "data.vocab_size",
            d.tokenizer != "bpe" or d.vocab_size >= 256,
            "must be >= 256 with tokenizer 'bpe' (byte-level BPE starts from 256 byte tokens)",
        ),
        ("data.val_fraction", 0 < d.val_fraction < 1, "must be > 0 and < 1"),
        ("data.max_docs", d.max_docs is None or d.max_docs >= 1, "must be >= 1 or null"),
        ("model.n_layer", m.n_layer >= 1, "must be >= 1"),
        ("model.d_model", m.d_model >= 1, "must be >= 1"),
        ("model.context", m.context >= 1, "must be >= 1"),
        ("model.dropout", 0 <= m.dropout < 1, "must be >= 0 and < 1"),
    ]
    if m.arch == "transformer":
        rules += _transformer_rules(m)
    else:
        rules += [("model.d_hidden", m.d_hidden >= 1, "must be >= 1")]
        rules += [
            (
                "model.rnn_layer_norm",
                not m.rnn_layer_norm or m.cell in ("lstm", "gru"),
                f"needs model.cell 'lstm' or 'gru' (got {m.cell!r})",
            )
        ]
    rules += [
        ("train.out_dir", bool(t.out_dir.strip()), "must not be empty"),
        ("train.seed", 0 <= t.seed < 2**32, "must be >= 0 and < 2**32"),
        ("train.batch_size", t.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", t.grad_accum >= 1, "must be >= 1"),
        ("train.max_steps", t.max_steps >= 1, "must be >= 1"),
        ("train.lr", t.lr > 0, "must be > 0"),
        ("train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "must be >= 0 and <= 1"),
        ("train.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        (
            "train.warmup_steps",
            t.warmup_steps <= t.max_steps,
            f"must be <= train.max_steps ({t.max_steps})",
        ),
        ("train.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("train.beta1", 0 <= t.beta1 < 1, "must be >= 0 and < 1"),
        ("train.beta2", 0 <= t.beta2 < 1, "must be >= 0 and < 1"),
        ("train.grad_clip", t.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.eval_every", t.eval_every >= 1, "must be >= 1"),
        ("train.eval_batches", t.eval_batches >= 1, "must be >= 1"),
        ("train.early_stop_patience", t.early_stop_patience >= 0, "must be >= 0 (0 = off)"),
        ("train.checkpoint_every", t.checkpoint_every >= 1, "must be >= 1"),
        ("train.keep_checkpoints", t.keep_checkpoints >= 1, "must be >= 1"),
        ("train.log_every", t.log_every >= 1, "must be >= 1"),
        ("train.sample_tokens", t.sample_tokens >= 0, "must be >= 0"),
        ("train.backend", bool(t.backend.strip()), "must not be empty"),
        ("train.threads", t.threads >= 0, "must be >= 0 (0 = torch's default)"),
        (
            "train.activation_checkpointing",
            not t.activation_checkpointing or m.arch == "transformer",
            "applies to model.arch 'transformer' only (the RNN LM's layers run as one "
            "fused recurrent stack)",
        ),
    ]
    return rules


def _transformer_rules(m: ModelConfig) -> list[tuple[str, bool, str]]:
    """Rules that only apply to ``arch: transformer`` (an RNN ignores heads and RoPE)."""
    rules = [
        ("model.n_head", m.n_head >= 1, "must be >= 1"),
        ("model.n_kv_head", m.n_kv_head is None or m.n_kv_head >= 1, "must be >= 1 or null"),
        ("model.mlp_ratio", m.mlp_ratio > 0, "must be > 0"),
        ("model.rope_theta", m.rope_theta > 0, "must be > 0"),
    ]
    if m.n_head >= 1:
        rules.append(
            (
                "model.d_model",
                m.d_model % m.n_head == 0,
                f"must be divisible by model.n_head ({m.n_head})",
            )
        )
        if m.n_kv_head is not None and m.n_kv_head >= 1:
            rules.append(
                (
                    "model.n_kv_head",
                    m.n_head % m.n_kv_head == 0,
                    f"must divide model.n_head ({m.n_head})",
                )
            )
        if m.pos == "rope" and m.d_model % m.n_head == 0:
            head_dim = m.d_model // m.n_head
            rules.append(
                (
                    "model.d_model",
                    head_dim % 2 == 0,
                    f"with pos 'rope' the head dim d_model / n_head (= {head_dim}) must be even",
                )
            )
    return rules


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise one ``ConfigError`` listing every broken rule, else return cfg."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"expected a RunConfig, got {type(cfg).__name__}")
    problems = _check_types(cfg)
    if not problems:  # value rules assume the types are right
        problems = [
            f"config key '{key}' {rule}, got {_current(cfg, key)!r}"
            for key, ok, rule in _rules(cfg)
            if not ok
        ]
    if problems:
        head = "invalid config: " if len(problems) == 1 else "invalid config:\n  "
        raise ConfigError(head + "\n  ".join(problems))
    return cfg


def _current(cfg: RunConfig, dotted: str) -> Any:
    section, name = dotted.split(".", 1)
    return getattr(getattr(cfg, section), name)


# ---------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe) of the config; ``config_from_dict`` inverts it."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild (and validate) a ``RunConfig`` from ``config_to_dict`` output.

    Missing keys take their defaults, so configs stored by older versions still load;
    unknown keys are an error.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
    cfg = RunConfig()
    _apply_mapping(cfg, d, where="")
    return validate(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    """The config as YAML text (sections and fields in declaration order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


def model_kwargs(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """The flat dict ``build_model`` takes: ``arch``, ``vocab_size`` and that arch's fields."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    if model.arch == "transformer":
        return {
            "arch": "transformer",
            "vocab_size": vocab_size,
            "context": model.context,
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_kv_head": model.n_kv_head if model.n_kv_head is not None else model.n_head,
            "d_model": model.d_model,
            "mlp": model.mlp,
            "mlp_ratio": model.mlp_ratio,
            "norm": model.norm,
            "pos": model.pos,
            "rope_theta": model.rope_theta,
            "bias": model.bias,
            "tie_embeddings": model.tie_embeddings,
            "dropout": model.dropout,
        }
    if model.arch == "rnn":
        return {
            "arch": "rnn",
            "vocab_size": vocab_size,
            "cell": model.cell,
            "n_layer": model.n_layer,
            "d_embed": model.d_model,
            "d_hidden": model.d_hidden,
            "dropout": model.dropout,
            "tie_embeddings": model.tie_embeddings,
            "context": model.context,
            # only when on, so plain RNN model args (and checkpoints) stay as they were
            **({"layer_norm": True} if model.rnn_layer_norm else {}),
        }
    raise ConfigError(f"config key 'model.arch' must be 'transformer' or 'rnn', got {model.arch!r}")
