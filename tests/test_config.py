"""Run config: defaults, YAML files, overrides, coercion, validation, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from turbolm.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _resolve_key,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    model_kwargs,
    validate,
)
from turbolm.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


# --------------------------------------------------------------------------------- defaults


def test_defaults_validate():
    cfg = validate(RunConfig())
    assert cfg.model.arch == "transformer" and cfg.data.sources == []
    assert load_config(None, []) == RunConfig()


def test_default_yaml_spells_out_the_defaults():
    assert load_config(CONFIGS / "default.yaml", []) == RunConfig()


@pytest.mark.parametrize("name", ["default", "tiny", "rnn"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", [])
    validate(cfg)


def test_tiny_config_is_tiny():
    cfg = load_config(CONFIGS / "tiny.yaml", [])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.context) == (2, 64, 64)
    assert cfg.train.max_steps == 30 and cfg.data.vocab_size == 512
    assert cfg.data.max_docs is not None and cfg.data.max_docs <= 50


def test_rnn_config_is_an_lstm():
    cfg = load_config(CONFIGS / "rnn.yaml", [])
    assert (cfg.model.arch, cfg.model.cell) == ("rnn", "lstm")


# ---------------------------------------------------------------------- YAML and overrides


@dataclasses.dataclass
class _A:
    lr: float = 1.0


@dataclasses.dataclass
class _B:
    lr: float = 1.0


@dataclasses.dataclass
class _Root:
    """A schema where two sections share a field name."""

    a: _A = dataclasses.field(default_factory=_A)
    b: _B = dataclasses.field(default_factory=_B)


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 6\ntrain:\n  lr: 3.0e-4\n  max_steps: 100\n")
    cfg = load_config(p, ["train.max_steps=200", "model.n_layer=2"])
    assert cfg.model.n_layer == 2  # override beats file
    assert cfg.train.lr == 3e-4  # from file
    assert cfg.train.max_steps == 200
    assert cfg.train.batch_size == TrainConfig().batch_size  # default


def test_later_override_wins():
    assert load_config(None, ["lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3


def test_unsectioned_keys():
    cfg = load_config(None, ["lr=3e-4", "n_layer=2", "vocab_size=1024", "tokenizer=bytes"])
    assert cfg.train.lr == 3e-4
    assert cfg.model.n_layer == 2
    assert (cfg.data.vocab_size, cfg.data.tokenizer) == (1024, "bytes")


def test_ambiguous_unsectioned_key_lists_candidates():
    # No field name is shared between sections today; check the rule on a schema that has one.
    with pytest.raises(ConfigError, match="ambiguous") as e:
        _resolve_key("lr", _Root)
    assert "'a.lr'" in str(e.value) and "'b.lr'" in str(e.value)
    assert _resolve_key("b.lr", _Root) == "b.lr"


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), []) == RunConfig()
    assert load_config(write(tmp_path, "train:\n"), []) == RunConfig()


# ---------------------------------------------------------------------------- coercion


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=3e-4", "train.lr", 3e-4),  # YAML 1.1 reads 3e-4 as a string
        ("train.lr=1", "train.lr", 1.0),  # int -> float
        ("train.max_steps=1e3", "train.max_steps", 1000),
        ("train.max_steps=1_000", "train.max_steps", 1000),
        ("train.tensorboard=false", "train.tensorboard", False),
        ("train.compile=yes", "train.compile", True),
        ("model.bias=True", "model.bias", True),
        ("model.n_kv_head=2", "model.n_kv_head", 2),
        ("model.n_kv_head=null", "model.n_kv_head", None),
        ("model.n_kv_head=None", "model.n_kv_head", None),
        ("data.max_docs=40", "data.max_docs", 40),
        ("data.dir=007", "data.dir", "007"),  # strings keep their text
        ("data.dir=my data/x", "data.dir", "my data/x"),
        ("data.sources=a.txt,b.txt", "data.sources", ["a.txt", "b.txt"]),
        ("data.sources=[a.txt, 'b c.jsonl']", "data.sources", ["a.txt", "b c.jsonl"]),
        ("data.sources=", "data.sources", []),
        ("data.include=*.py,**/*.md", "data.include", ["*.py", "**/*.md"]),
        ("data.tokenizer=BYTES", "data.tokenizer", "bytes"),
        ("model.arch=rnn", "model.arch", "rnn"),
        ("train.out_dir=runs/x=y", "train.out_dir", "runs/x=y"),  # split on the first '='
    ],
)
def test_override_coercion(override, key, expected):
    cfg = load_config(None, [override])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected and type(value) is type(expected)


def test_yaml_coercion(tmp_path):
    text = "data:\n  sources: a.txt, b.txt\n  dir: 2024\ntrain:\n  lr: 1e-3\n  beta1: 0\n"
    cfg = load_config(write(tmp_path, text), [])
    assert cfg.data.sources == ["a.txt", "b.txt"]
    assert cfg.data.dir == "2024"
    assert cfg.train.lr == 1e-3  # "1e-3" is a string to YAML 1.1
    assert cfg.train.beta1 == 0.0 and type(cfg.train.beta1) is float


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=abc", "'train.lr' must be a number"),
        ("train.max_steps=1.5", "'train.max_steps' must be an integer"),
        ("train.max_steps=true", "'train.max_steps' must be an integer"),
        ("model.bias=1", "'model.bias' must be true or false"),
        ("model.mlp=relu", "'model.mlp' must be one of 'gelu', 'swiglu'"),
        ("train.device=tpu", "'train.device' must be one of"),
        ("train.lr=.nan", "'train.lr' must be a finite number"),
        ("model.n_layer=null", "'model.n_layer' must be an integer"),
        ("data.sources={a: 1}", "'data.sources' must be a list of strings"),
    ],
)
def test_bad_types(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


# ------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.lrr=1", "train.lr"),
        ("lrr=1", "train.lr"),
        ("model.lr=1", "train.lr"),  # right name, wrong section
        ("trian.max_steps=1", "train.max_steps"),
        ("model.nlayer=2", "model.n_layer"),
        ("batchsize=2", "train.batch_size"),
    ],
)
def test_unknown_override_key_suggests(override, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "unknown config key" in msg and override.split("=")[0] in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_key_exact_message():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=1"])
    assert str(e.value) == "unknown config key 'train.lrr' (did you mean 'train.lr'?)"


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'zzzzqqq'$"):
        load_config(None, ["zzzzqqq=1"])


def test_unknown_keys_in_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lrr: 1.0e-3\n"), [])
    assert "'train.lrr'" in str(e.value) and "did you mean 'train.lr'" in str(e.value)
    assert "run.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 1.0e-3\n"), [])
    # a field at the top level: point to its section
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(write(tmp_path, "lr: 1.0e-3\n"), [])


# --------------------------------------------------------------------------- YAML errors


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(missing, [])
    assert str(missing) in str(e.value)


def test_yaml_syntax_error_gives_line(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0\n  max_steps: [1, 2\nmodel:\n  n_layer: 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+") as e:
        load_config(p, [])
    assert str(p) in str(e.value)


def test_yaml_bad_indentation_line(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0\n    max_steps: 3\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(p, [])


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_top_level_not_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, text), [])


def test_yaml_section_not_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"), [])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, key, rule",
    [
        ("train.lr=0", "train.lr", "> 0"),
        ("train.lr=-1e-3", "train.lr", "> 0"),
        ("train.batch_size=0", "train.batch_size", ">= 1"),
        ("train.grad_accum=0", "train.grad_accum", ">= 1"),
        ("train.max_steps=0", "train.max_steps", ">= 1"),
        ("model.dropout=1.0", "model.dropout", "< 1"),
        ("model.dropout=-0.1", "model.dropout", ">= 0"),
        ("model.n_head=5", "model.d_model", "divisible by model.n_head"),
        ("model.n_kv_head=3", "model.n_kv_head", "must divide model.n_head"),
        ("model.n_kv_head=0", "model.n_kv_head", ">= 1"),
        ("model.n_layer=0", "model.n_layer", ">= 1"),
        ("model.context=0", "model.context", ">= 1"),
        ("model.mlp_ratio=0", "model.mlp_ratio", "> 0"),
        ("model.rope_theta=0", "model.rope_theta", "> 0"),
        ("train.warmup_steps=700", "train.warmup_steps", "<= train.max_steps"),
        ("train.warmup_steps=-1", "train.warmup_steps", ">= 0"),
        ("data.val_fraction=0", "data.val_fraction", "> 0 and < 1"),
        ("data.val_fraction=1", "data.val_fraction", "> 0 and < 1"),
        ("data.vocab_size=100", "data.vocab_size", ">= 256"),
        ("data.max_docs=0", "data.max_docs", ">= 1"),
        ("data.dir=", "data.dir", "must not be empty"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints", ">= 1"),
        ("train.checkpoint_every=0", "train.checkpoint_every", ">= 1"),
        ("train.eval_every=0", "train.eval_every", ">= 1"),
        ("train.eval_batches=0", "train.eval_batches", ">= 1"),
        ("train.log_every=0", "train.log_every", ">= 1"),
        ("train.early_stop_patience=-1", "train.early_stop_patience", ">= 0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio", "<= 1"),
        ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
        ("train.beta1=1", "train.beta1", "< 1"),
        ("train.beta2=1.5", "train.beta2", "< 1"),
        ("train.grad_clip=-1", "train.grad_clip", ">= 0"),
        ("train.sample_tokens=-1", "train.sample_tokens", ">= 0"),
        ("train.threads=-2", "train.threads", ">= 0"),
        ("train.seed=-1", "train.seed", ">= 0"),
        ("train.backend=", "train.backend", "must not be empty"),
        ("train.out_dir=", "train.out_dir", "must not be empty"),
    ],
)
def test_invalid_values(override, key, rule):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and rule in msg


def test_rope_needs_even_head_dim():
    with pytest.raises(ConfigError, match="head dim .* must be even"):
        load_config(None, ["model.d_model=36", "model.n_head=4"])  # head dim 9
    cfg = load_config(None, ["model.d_model=36", "model.n_head=4", "model.pos=learned"])
    assert cfg.model.d_model == 36


def test_transformer_rules_do_not_apply_to_rnn():
    cfg = load_config(None, ["model.arch=rnn", "model.n_head=3"])
    assert cfg.model.arch == "rnn"
    with pytest.raises(ConfigError, match="'model.d_hidden'"):
        load_config(None, ["model.arch=rnn", "model.d_hidden=0"])


def test_activation_checkpointing_is_for_the_transformer():
    assert load_config(None, ["train.activation_checkpointing=true"]).train.activation_checkpointing
    with pytest.raises(ConfigError, match="'train.activation_checkpointing'.*transformer"):
        load_config(None, ["model.arch=rnn", "train.activation_checkpointing=true"])


def test_bytes_tokenizer_ignores_vocab_size_floor():
    assert load_config(None, ["tokenizer=bytes", "vocab_size=10"]).data.tokenizer == "bytes"


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=0", "train.batch_size=0"])
    assert "'train.lr'" in str(e.value) and "'train.batch_size'" in str(e.value)


def test_validate_checks_types_of_code_built_configs():
    cfg = RunConfig(train=TrainConfig(lr="fast"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'train.lr' must be a number"):
        validate(cfg)
    cfg = RunConfig(model=ModelConfig(norm="batchnorm"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'model.norm' must be one of"):
        validate(cfg)
    cfg = RunConfig(data=DataConfig(sources="a.txt"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'data.sources' must be a list of strings"):
        validate(cfg)


# ------------------------------------------------------------------------------ round trips


def test_dict_round_trip():
    cfg = load_config(
        None,
        ["lr=3e-4", "model.n_kv_head=2", "data.sources=a.txt,b.txt", "data.max_docs=7"],
    )
    d = config_to_dict(cfg)
    assert isinstance(d["train"], dict) and d["train"]["lr"] == 3e-4
    assert config_from_dict(d) == cfg
    # the dict survives JSON (how checkpoints store it)
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_from_dict_fills_missing_and_rejects_unknown():
    cfg = config_from_dict({"train": {"lr": 0.01}})
    assert cfg.train.lr == 0.01 and cfg.model == ModelConfig()
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        config_from_dict({"train": {"lrr": 0.01}})
    with pytest.raises(ConfigError, match="'train.lr' must be > 0"):
        config_from_dict({"train": {"lr": -1.0}})


def test_dump_yaml_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.norm=rmsnorm", "data.include=*.py"])
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == config_to_dict(cfg)
    p = tmp_path / "dumped.yaml"
    p.write_text(text)
    assert load_config(p, []) == cfg


# ------------------------------------------------------------------------------ model kwargs


def test_model_kwargs_transformer():
    cfg = load_config(None, ["model.n_head=8", "model.n_kv_head=2"])
    kw = model_kwargs(cfg.model, 4096)
    assert kw == {
        "arch": "transformer",
        "vocab_size": 4096,
        "context": 128,
        "n_layer": 4,
        "n_head": 8,
        "n_kv_head": 2,
        "d_model": 192,
        "mlp": "gelu",
        "mlp_ratio": 4.0,
        "norm": "layernorm",
        "pos": "rope",
        "rope_theta": 10000.0,
        "bias": False,
        "tie_embeddings": True,
        "dropout": 0.0,
    }
    assert model_kwargs(RunConfig().model, 100)["n_kv_head"] == 4  # None = n_head


def test_model_kwargs_rnn():
    cfg = load_config(CONFIGS / "rnn.yaml", [])
    kw = model_kwargs(cfg.model, 512)
    assert kw == {
        "arch": "rnn",
        "vocab_size": 512,
        "cell": "lstm",
        "n_layer": cfg.model.n_layer,
        "d_embed": cfg.model.d_model,
        "d_hidden": cfg.model.d_hidden,
        "dropout": cfg.model.dropout,
        "tie_embeddings": cfg.model.tie_embeddings,
        "context": cfg.model.context,
    }


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "512"])
def test_model_kwargs_rejects_bad_vocab(bad):
    with pytest.raises(ConfigError, match="vocab_size"):
        model_kwargs(RunConfig().model, bad)
