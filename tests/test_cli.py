"""CLI integration: prepare -> train -> eval -> generate on a small corpus, exact resume after
SIGKILL, SIGTERM handling, and one clear message + non-zero exit for every kind of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turbolm.cli import main

# A tiny but real run: seconds on 2 CPU cores.
TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.context=32",
    "train.batch_size=4",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.checkpoint_every=6",
    "train.log_every=1",
    "train.sample_tokens=8",
    "train.tensorboard=false",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few real Python files (from the stdlib's json package) as the user's corpus."""
    import json as json_pkg

    src = Path(json_pkg.__file__).parent
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted(src.glob("*.py")):
        (root / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    rc = main(
        [
            "prepare",
            str(corpus),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--no-progress",
            "--val-fraction",
            "0.3",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def trained_run(prepared, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    rc = main(["train", "--no-progress", f"data.dir={prepared}", f"train.out_dir={run}", *TINY])
    assert rc == 0
    return run


def _run_cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "turbolm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        **kwargs,
    )


def _losses(run: Path) -> dict[int, float]:
    """step -> train loss; a later record of the same step (after a resume) wins."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def test_prepare_train_eval_generate(trained_run, prepared, capsys):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["vocab_size"] == 300
    ckpts = sorted((trained_run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_00000006", "step_00000012"]
    losses = _losses(trained_run)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]  # it learns

    assert main(["eval", "--checkpoint", str(trained_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 12 and 0 < metrics["loss"] < 10 and 0 <= metrics["accuracy"] <= 1

    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(trained_run),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "10",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(trained_run),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "10",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == first  # greedy is deterministic


def test_generate_with_the_decode_kernel_matches_reference(trained_run, capsys):
    """`turbolm generate` at temperature 0: the C++ decode kernel (named, so it is built if
    needed) and the reference attention give the same text."""
    from turbolm import ext

    if ext.load_extension() is None:
        pytest.skip(f"C++ extension unavailable: {ext.extension_status(build=False)[1]}")
    outputs = []
    for backend in ("attention=cpu", "reference"):
        argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "def ",
                "--max-new-tokens", "30", "--temperature", "0", "--no-stop", "--backend", backend]  # fmt: skip
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > len("def ")


def test_eval_on_raw_files(trained_run, corpus, capsys):
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(trained_run),
            "--data",
            str(corpus / "decoder.py"),
            "--json",
            "--max-batches",
            "2",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_exact_resume_after_sigkill(prepared, tmp_path):
    """A run killed with SIGKILL after its step-10 checkpoint and resumed gives the same loss at
    every later step as an uninterrupted run."""
    common = [
        f"data.dir={prepared}",
        *TINY,
        "model.d_model=64",
        "model.dropout=0.1",
        "train.max_steps=30",
        "train.checkpoint_every=10",
        "train.eval_every=10",
    ]
    full = tmp_path / "full"
    done = _run_cli("train", "--no-progress", f"train.out_dir={full}", *common)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turbolm",
            "train",
            "--no-progress",
            f"train.out_dir={killed}",
            *common,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = _run_cli("train", "--no-progress", "--resume", f"train.out_dir={killed}", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    expected, got = _losses(full), _losses(killed)
    assert [got[s] for s in range(11, 31)] == [expected[s] for s in range(11, 31)]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(prepared, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "turbolm",
            "train",
            "--no-progress",
            f"train.out_dir={run}",
            f"data.dir={prepared}",
            *TINY,
            "train.max_steps=100000",
            "train.checkpoint_every=100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in err and "SIGTERM" in err
    ckpts = list((run / "checkpoints").glob("step_*/COMPLETE"))
    assert len(ckpts) == 1


# ------------------------------------------------------------------------------ bad input


def _fails(capsys, argv, *needles):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_and_empty_inputs(capsys, tmp_path):
    _fails(
        capsys, ["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(capsys, ["prepare", str(empty), "--out", str(tmp_path / "o")], "empty.txt")
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_suggests_the_closest(capsys):
    _fails(capsys, ["train", "train.lrr=0.1"], "train.lrr", "train.lr")


def test_invalid_values(capsys, tmp_path):
    _fails(capsys, ["train", "train.lr=-1"], "train.lr")
    _fails(capsys, ["train", "model.d_model=30", "model.n_head=4"], "d_model")
    _fails(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml")


def test_existing_run_folder_is_not_overwritten(capsys, trained_run, prepared):
    before = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    _fails(
        capsys,
        ["train", f"data.dir={prepared}", f"train.out_dir={trained_run}", *TINY],
        "--overwrite",
        "--resume",
    )
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == before


def test_truncated_and_foreign_checkpoints(capsys, trained_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_run / "checkpoints" / "step_00000012", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _fails(capsys, ["eval", "--checkpoint", str(bad)], str(bad))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    _fails(capsys, ["generate", "--checkpoint", str(foreign)], "foreign")
    _fails(capsys, ["eval", "--checkpoint", str(tmp_path / "none")], "none")


def test_context_larger_than_the_model(capsys, trained_run):
    _fails(capsys, ["eval", "--checkpoint", str(trained_run), "--context", "4096"], "context")


def test_bad_generation_arguments(capsys, trained_run):
    _fails(
        capsys, ["generate", "--checkpoint", str(trained_run), "--temperature", "-1"], "temperature"
    )
    _fails(capsys, ["generate", "--checkpoint", str(trained_run), "--top-p", "1.5"], "top_p")
    _fails(
        capsys,
        ["generate", "--checkpoint", str(trained_run), "--max-new-tokens", "0"],
        "max-new-tokens",
    )


def test_doctor_lists_every_op_and_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for op in ("layer_norm", "rms_norm", "attention", "lstm", "gru", "rnn"):
        assert f"  {op}: " in out
    assert "reference" in out and "torch" in out


def test_unknown_benchmark(capsys):
    _fails(capsys, ["bench", "nope"], "no benchmark named 'nope'")
