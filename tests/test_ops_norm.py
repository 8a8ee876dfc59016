"""LayerNorm / RMSNorm op layer: torch backend vs the fp64 reference, gradients, errors."""

import os

import pytest
import torch

from tests.harness import OpCase, check_backend
from turbolm.errors import DeviceError, DTypeError, InputError, ShapeError
from turbolm.nn import LayerNorm, RMSNorm
from turbolm.ops import layer_norm, rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 7), (5, 64), (7, 769), (2, 1023)]


def _norm_case(op, rows, n, affine, scale=1.0, zero_var=False, non_contiguous=False):
    def make(gen):
        x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * scale + 0.5 * scale
        if zero_var:
            x[0] = 3.0
        if non_contiguous:
            x = torch.randn(n, rows, generator=gen, dtype=torch.float64).t()
        inputs = {"x": x}
        if affine:
            inputs["weight"] = 1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
            if op == "layer_norm":
                inputs["bias"] = torch.randn(n, generator=gen, dtype=torch.float64)
        return inputs

    if op == "layer_norm":

        def call(backend, x, weight=None, bias=None):
            return layer_norm(x, n, weight, bias, 1e-5, backend=backend)

        grads = ("x", "weight", "bias") if affine else ("x",)
        if n == 1:
            # One column: x - mean is 0, so dx is 0 in exact arithmetic, but fp32 computes it as
            # a difference of rounded terms times rstd = 1/sqrt(eps) ~ 316 (torch's own kernel
            # gives ~3e-5). The fp32 bound scales by that factor; the fp32 reference itself is
            # exact here, so the usual 2x-baseline term is 0.
            case = OpCase(f"{op}[{rows}x{n}]", call, make, grad=grads)
            case.atol = {torch.float32: 1e-5 / 1e-5**0.5}
            return case
    else:

        def call(backend, x, weight=None):
            return rms_norm(x, n, weight, 1e-6, backend=backend)

        grads = ("x", "weight") if affine else ("x",)
    return OpCase(f"{op}[{rows}x{n}]", call, make, grad=grads)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_torch_backend_matches_reference(op, dtype, rows, n):
    check_backend(_norm_case(op, rows, n, affine=True), "torch", dtype)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize(
    "variant",
    [
        {"affine": False},
        {"affine": True, "scale": 1e4},
        {"affine": True, "zero_var": True},
        {"affine": True, "non_contiguous": True},
    ],
    ids=["no_affine", "large", "zero_variance", "non_contiguous"],
)
def test_torch_backend_edge_cases(op, variant):
    check_backend(_norm_case(op, 5, 33, **variant), "torch", torch.float32)


def test_gradcheck_reference_float64():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer_norm(x, 6, w, b, backend="reference"), (x, w, b)
    )
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, 6, w, backend="reference"), (x, w))


def test_multi_dim_normalized_shape_matches_torch():
    x = torch.randn(2, 3, 4, 5)
    w, b = torch.randn(4, 5), torch.randn(4, 5)
    expected = torch.nn.functional.layer_norm(x, (4, 5), w, b)
    got = layer_norm(x, (4, 5), w, b, backend="reference")
    torch.testing.assert_close(got, expected)


def test_nn_modules_are_drop_in():
    ref = torch.nn.LayerNorm(16, eps=1e-6)
    ref.weight.data.normal_()
    ours = LayerNorm(16, eps=1e-6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref_rms = torch.nn.RMSNorm(16)
    ref_rms.weight.data.normal_()
    ours_rms = RMSNorm(16)
    ours_rms.load_state_dict(ref_rms.state_dict())
    torch.testing.assert_close(ours_rms(x), ref_rms(x))
    assert isinstance(LayerNorm(8, bias=False), torch.nn.LayerNorm)


def test_errors_are_typed_and_name_the_argument():
    x = torch.randn(3, 8)
    with pytest.raises(DTypeError, match="x must have dtype"):
        layer_norm(torch.ones(3, 8, dtype=torch.int64), 8)
    with pytest.raises(ShapeError, match="weight must have shape"):
        layer_norm(x, 8, torch.ones(7))
    with pytest.raises(InputError, match="normalized_shape"):
        rms_norm(x, 9)
    with pytest.raises(DeviceError, match="same device"):
        layer_norm(x, 8, torch.ones(8, device="meta"))
    with pytest.raises(DTypeError, match="weight"):
        rms_norm(x, 8, torch.ones(8, dtype=torch.int32))


# ---- the benchmark's CPU smoke mode: result files and the plot ------------------------------


def _load_bench_norm():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_norm.py"
    spec = importlib.util.spec_from_file_location("bench_norm", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_norm", bench)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_dry_run_writes_csv_md_png(tmp_path):
    import csv

    pytest.importorskip("matplotlib")  # in the dev and bench extras
    bench = _load_bench_norm()
    rows = bench.main(["--dry-run", "--out", str(tmp_path), "--ops", "layer_norm,rms_norm"])
    measured = [r for r in rows if r["rows"] is not None]
    assert {r["backend"] for r in measured} == {"torch", "reference"}
    assert len(measured) == 2 * 2 * 2  # ops x sizes x backends
    for r in measured:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_bwd_GBps"] > 0
        assert r["err_y"] < 1e-4 and r["err_dx"] < 1e-4 and r["err_dw"] < 1e-3
    # Peers not runnable on CPU get a row saying why (not installed, or needs a GPU).
    peers = [r for r in rows if r["backend"] in ("liger", "apex")]
    assert len(peers) == 4 and all(r["note"].startswith("not run: ") for r in peers)
    with open(tmp_path / "norm.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and "note" in table[0]
    md = (tmp_path / "norm.md").read_text()
    assert "Command: `" in md and "--dry-run" in md and "| liger |" in md
    png = (tmp_path / "norm.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_benchmark_plot_skips_not_run_rows(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load_bench_norm()
    row = bench.not_run_row("layer_norm", torch.bfloat16, "apex", "not installed")
    bench.plot([row], tmp_path / "x.png", ceiling=1.0)  # nothing measured: no figure
    assert not (tmp_path / "x.png").exists()


def test_benchmark_ratio_notes():
    bench = _load_bench_norm()
    base = {"op": "layer_norm", "dtype": "float32", "rows": 4, "N": 8}
    rows = [
        {**base, "backend": "torch", "fwd_bwd_ms": 2.0, "fwd_bwd_min_ms": 1.0},
        {**base, "backend": "cpu", "fwd_bwd_ms": 1.0, "fwd_bwd_min_ms": 1.0},
    ]
    (note,) = bench.ratio_notes(rows)
    assert "cpu, layer_norm float32 4x8: x2.00 vs torch (min times: x1.00)" in note


def test_benchmark_budget_still_writes_results(tmp_path):
    bench = _load_bench_norm()
    rows = bench.main(
        ["--dry-run", "--out", str(tmp_path), "--ops", "layer_norm", "--budget-s", "1e-9"]
    )
    assert not [r for r in rows if r["rows"] is not None]  # nothing started after the budget
    md = (tmp_path / "norm.md").read_text()
    assert "Time budget" in md and "layer_norm float32 64x96 torch" in md


DYNAMIC_COMPILE_SCRIPT = """
import torch
import turbolm
from turbolm.nn import LayerNorm

for backend in ("torch", "reference"):
    torch._dynamo.reset()
    module = LayerNorm(16)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
    for steps in (5, 7):
        x = torch.randn(2, steps, 16)
        with turbolm.use_backend(backend):
            y = compiled(x)
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,), module.weight))
print("dynamic compile ok")
"""


def test_torch_compile_dynamic_shapes():
    """torch.compile(dynamic=True) makes the module's eps a symbolic float: the eps check used
    math.isfinite, which dynamo cannot trace on one (Unsupported under fullgraph). In a fresh
    process: a torch.compile trace of turbolm code leaves the Triton interpreter unable to
    run later kernels of the same process (tl.zeros stays a JITFunction), which would break
    the interpreter tests that follow."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TURBOLM_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", DYNAMIC_COMPILE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and "dynamic compile ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )


def test_bad_arguments_are_typed_errors():
    """normalized_shape as a string was split into digits ("16" -> (1, 6)), None and a string
    eps raised bare TypeErrors; a wrong trailing shape is a ShapeError (an InputError)."""
    x = torch.randn(2, 16)
    for bad in ("16", None, [4.5j]):
        with pytest.raises(InputError, match="normalized_shape must be an int or a sequence"):
            layer_norm(x, bad)
    with pytest.raises(InputError, match="eps must be a finite number >= 0, got '1e-5'"):
        layer_norm(x, 16, eps="1e-5")
    with pytest.raises(InputError, match="eps must be a finite number"):
        rms_norm(x, 16, eps=float("nan"))
    with pytest.raises(ShapeError, match=r"x must end with normalized_shape \(8,\)"):
        layer_norm(x, 8)
