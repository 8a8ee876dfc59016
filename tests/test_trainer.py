"""Trainer pieces: schedule, run-folder rules, precision, early stopping, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch

from turbolm.config import load_config
from turbolm.data import prepare
from turbolm.errors import ConfigError
from turbolm.train.trainer import (
    Trainer,
    lr_factor,
    prepare_run_dir,
    resolve_precision,
)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, max_steps=110, min_ratio=0.1) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[110] == pytest.approx(0.1)


def test_run_dir_rules(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, resume=False, overwrite=False) is None
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.jsonl").exists()  # nothing was touched
    assert prepare_run_dir(run, resume=True, overwrite=False) is None  # nothing to resume yet
    prepare_run_dir(run, resume=False, overwrite=True)
    assert list(run.iterdir()) == []
    with pytest.raises(ConfigError, match="exclude"):
        prepare_run_dir(run, resume=True, overwrite=True)


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_precision("bf16", cpu)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    import textwrap

    for i in range(8):
        body = textwrap.dedent(
            f"""
            def function_{i}(value):
                result = value * {i} + {i * 3}
                if result > {i * 10}:
                    return result - {i}
                return result
            """
        )
        (root / f"mod{i}.py").write_text(body * 20)
    out = tmp_path_factory.mktemp("prepared") / "d"
    prepare(str(out), [str(root)], vocab_size=300, val_fraction=0.25, progress=False)
    return out


def _cfg(data_dir, out_dir, *extra):
    return load_config(
        None,
        [
            f"data.dir={data_dir}",
            f"train.out_dir={out_dir}",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.context=16",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "train.tensorboard=true",
            "train.sample_tokens=5",
            *extra,
        ],
    )


def test_early_stopping_with_patience(data_dir, tmp_path):
    # A huge constant lr without clipping makes val loss stop improving quickly.
    cfg = _cfg(
        data_dir,
        tmp_path / "run",
        "train.max_steps=200",
        "train.eval_every=2",
        "train.early_stop_patience=2",
        "train.lr=3.0",
        "train.grad_clip=0",
        "train.warmup_steps=1",
        "train.min_lr_ratio=1.0",
    )
    result = Trainer(cfg, progress=False).run()
    assert result.stopped_early
    assert result.step < 200
    evals = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    best = min(e["val_loss"] for e in evals)
    # the last `patience` evaluations did not improve on the best before them
    assert all(e["val_loss"] >= best for e in evals[-2:])
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_training_learns_and_reports(data_dir, tmp_path):
    cfg = _cfg(
        data_dir, tmp_path / "run", "train.max_steps=60", "train.eval_every=30", "train.lr=1e-2"
    )
    result = Trainer(cfg, progress=False).run()
    assert result.step == 60 and not result.stopped_early
    assert result.val["loss"] < result.unigram_entropy  # it uses context
    assert math.isclose(result.val["perplexity"], math.exp(result.val["loss"]), rel_tol=1e-9)
    assert result.sample.startswith("def ")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])


def _train_losses(data_dir, out, *overrides):
    """(per-step train losses, final val loss) of a short run logged every step."""
    cfg = _cfg(data_dir, out, "train.sample_tokens=0", "train.log_every=1", *overrides)
    result = Trainer(cfg, progress=False).run()
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and "val_loss" not in line
    ]
    return losses, result.val["loss"]


def test_activation_checkpointing_trains_identically(data_dir, tmp_path):
    """Same losses and weights with and without recomputation (fp32, CPU, with dropout)."""
    runs = {
        flag: _train_losses(
            data_dir,
            tmp_path / f"ckpt_{flag}",
            "train.max_steps=4",
            "train.eval_every=4",
            "model.dropout=0.1",
            f"train.activation_checkpointing={flag}",
        )  # fmt: skip
        for flag in ("false", "true")
    }
    assert runs["true"] == runs["false"] and len(runs["true"][0]) == 4


@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_fused_cross_entropy_trains_like_the_logits_path(data_dir, tmp_path, arch):
    """train.fused_cross_entropy: the same per-step losses (fp32, to rounding) as without."""
    runs = {
        flag: _train_losses(
            data_dir,
            tmp_path / f"{arch}_{flag}",
            f"model.arch={arch}",
            "model.d_hidden=32",
            "train.max_steps=5",
            "train.eval_every=5",
            f"train.fused_cross_entropy={flag}",
        )  # fmt: skip
        for flag in ("false", "true")
    }
    assert len(runs["true"][0]) == 5
    assert runs["true"][0] == pytest.approx(runs["false"][0], abs=1e-5)
    assert runs["true"][1] == pytest.approx(runs["false"][1], abs=1e-5)
