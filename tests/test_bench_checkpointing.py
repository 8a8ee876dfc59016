"""``benchmarks/bench_checkpointing.py``: a tiny CPU run writes both rows with finite numbers,
and recomputation keeps less for backward."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_checkpointing.py"
    spec = importlib.util.spec_from_file_location("bench_checkpointing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_checkpointing_cpu_smoke(tmp_path, capsys):
    assert _bench().main(["--sizes", "tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "checkpointing.csv") as handle:
        off, on = csv.DictReader(handle)
    assert (off["checkpointing"], on["checkpointing"]) == ("False", "True")
    for row in (off, on):
        for key in ("saved_MB", "step_ms", "step_min_ms", "time_vs_off"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, key
    assert float(on["saved_MB"]) < float(off["saved_MB"])
    assert "benchmarks/bench_checkpointing.py --sizes tiny --reps 1" in capsys.readouterr().out


def test_bench_checkpointing_rejects_unknown_size():
    with pytest.raises(SystemExit):
        _bench().main(["--sizes", "huge"])
