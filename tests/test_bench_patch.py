"""``benchmarks/bench_patch.py`` (apply_turbolm on a transformers model): a tiny CPU run of every
code path writes the result files with the expected rows, columns and finite numbers."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def _load_bench_patch():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_patch.py"
    spec = importlib.util.spec_from_file_location("bench_patch", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_patch", bench)
    spec.loader.exec_module(bench)
    return bench


TINY = [
    "--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
    "--intermediate", "128", "--vocab", "256", "--batch", "2", "--seq", "16",
    "--steps", "1", "--warmup", "0",
]  # fmt: skip
NUMBERS = ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_min_ms", "tokens_per_s", "loss", "max_logit_err")


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_bench_patch_cpu_smoke(tmp_path):
    from turbolm import ext

    bench = _load_bench_patch()
    # turbolm_cpu names the cpu backend, which would build the C++ extension: only when built.
    configs = ["hf_sdpa", "hf_eager", "turbolm_auto", "turbolm_triton"]
    if ext.is_built():
        configs += ["turbolm_cpu", "turbolm_cpu_fused_loss"]
    argv = [*TINY, "--configs", ",".join(configs), "--out", str(tmp_path)]
    rows = bench.main(argv)
    assert [r["config"] for r in rows] == configs
    table = _csv(tmp_path / "patch.csv")
    assert tuple(table[0]) == bench.COLUMNS
    assert [r["config"] for r in table] == configs
    measured = [r for r in table if r["config"] != "turbolm_triton"]
    for r in measured:
        assert r["note"] == "" and r["steps"] == "1", r
        for col in NUMBERS:
            assert math.isfinite(float(r[col])) and float(r[col]) >= 0, (r["config"], col)
        assert float(r["fwd_ms"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["max_logit_err"]) < 1e-4  # fp32 vs the fp64 reference
        assert float(r["speedup_fwd_bwd"]) > 0
        assert r["peak_mem_MB"] == ""  # not measured on CPU
        assert r["err_reference"] == "unpatched fp64 (CPU)"
    assert float(table[0]["speedup_fwd_bwd"]) == 1.0  # hf_sdpa is the baseline
    patched = [r for r in measured if r["config"].startswith("turbolm_")]
    assert all("rms_norm:" in r["backends_used"] for r in patched)
    # A CUDA-only configuration on CPU: a row saying why, the run goes on.
    (triton,) = [r for r in table if r["config"] == "turbolm_triton"]
    assert triton["note"].startswith("not run: ") and triton["fwd_ms"] == ""
    md = (tmp_path / "patch.md").read_text()
    assert "Command: `" in md and "--configs" in md and "transformers" in md
    assert "turbolm_auto vs hf_sdpa" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "patch.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_patch_padding_and_budget(tmp_path):
    """Left padding (the attention mask path) on GPT-2 (LayerNorm), and a spent time budget:
    the configurations not started get a note, the files are still written."""
    bench = _load_bench_patch()
    argv = [
        *TINY, "--family", "gpt2", "--padding", "0.3", "--configs", "hf_sdpa,turbolm_auto",
        "--out", str(tmp_path),
    ]  # fmt: skip
    rows = bench.main(argv)
    assert all(r["note"] == "" and r["max_logit_err"] < 1e-4 for r in rows), rows
    assert "layer_norm:" in rows[1]["backends_used"]
    assert bench.left_pads(2, 16, 0.3) == [0, 10]
    rows = bench.main([*argv, "--budget-s", "1e-9", "--name", "cut"])
    assert all(r["note"].startswith("not run: time budget") for r in rows)
    assert "Time budget" in (tmp_path / "cut.md").read_text()


def test_bench_patch_interrupt_keeps_measured_rows(tmp_path, monkeypatch):
    """A time box's SIGINT (gpu_check.sh) during a configuration: the rows measured before it
    are still written, the rest say they were interrupted."""
    bench = _load_bench_patch()
    measure = bench.measure

    def interrupted(model, config, *args, **kwargs):
        if config == "turbolm_auto":
            raise KeyboardInterrupt
        return measure(model, config, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", interrupted)
    argv = [*TINY, "--configs", "hf_sdpa,turbolm_auto,hf_eager", "--out", str(tmp_path)]
    rows = bench.main(argv)
    assert [r["config"] for r in rows] == ["hf_sdpa", "turbolm_auto", "hf_eager"]
    assert rows[0]["fwd_bwd_ms"] > 0 and rows[0]["note"] == ""
    assert [r["note"] for r in rows[1:]] == ["not run: interrupted"] * 2
    assert len(_csv(tmp_path / "patch.csv")) == 3
