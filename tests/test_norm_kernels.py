"""LayerNorm / RMSNorm kernel backends (``cpu``, ``triton``, ``cuda``) against the reference.

On a machine without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1,
set below before any kernel module is imported) on CPU tensors with small shapes; the large
sweeps are marked ``slow``. ``gpu`` tests run the ``cuda`` and ``triton`` backends on CUDA
tensors. Every output is poisoned with NaN before the kernels run (TURBOLM_POISON_OUTPUTS=1),
so an element a kernel forgets to write fails the finiteness check.

The ``cpu`` tests build the C++ extension on first use (about a minute; cached afterwards).
"""

import os

import torch

if not torch.cuda.is_available():  # Triton on CPU tensors: the interpreter (before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.harness import OpCase, assert_fresh_process_prints, check_backend  # noqa: E402
from turbolm import ext  # noqa: E402
from turbolm.errors import BackendError, DeviceError, DTypeError, ShapeError  # noqa: E402
from turbolm.ops import (  # noqa: E402
    layer_norm,
    norm_kernels,  # noqa: E402
    registry,
    rms_norm,
    use_backend,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ["layer_norm", "rms_norm"]

# N in {1, 7, 64, 769, 1023, 4096, 8193, 65536}, rows 1 and odd counts.
CPU_SHAPES = [(1, 1), (3, 7), (37, 64), (1, 769), (5, 1023), (7, 4096), (3, 8193), (2, 65536)]
TRITON_SHAPES = [(1, 1), (3, 7), (9, 64), (1, 769), (3, 1023), (2, 4096)]
TRITON_SLOW_SHAPES = [(5, 8193), (2, 65536), (33, 769)]
GPU_SHAPES = [
    (1, 1),
    (3, 7),
    (37, 64),
    (1, 769),
    (5, 1023),
    (7, 4096),
    (3, 8193),
    (2, 65536),
    (4099, 768),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("TURBOLM_POISON_OUTPUTS", "1")


@pytest.fixture(scope="module")
def built():
    """The C++ extension (built on first use); skips the cpu tests if it cannot be built
    (test_extension_builds then fails with the reason)."""
    if ext.load_extension() is None:
        pytest.skip(f"C++ extension unavailable: {ext.extension_status(build=False)[1]}")
    return ext.load_extension()


def norm_case(
    op,
    rows,
    n,
    *,
    weight=True,
    bias=True,
    scale=1.0,
    zero_var=False,
    non_contiguous=False,
    batch=None,
    eps=None,
):
    """OpCase for ``op`` on x (rows, n) (or batch + (n,)); inputs as fp64 masters."""
    shape = (*batch, n) if batch else (rows, n)

    def make(gen):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + 0.25 * scale
        if zero_var:
            x.view(-1, n)[0] = 3.0 * scale  # a constant row: variance 0
        inputs = {"x": x}
        if weight:
            inputs["weight"] = 1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        if bias and op == "layer_norm":
            inputs["bias"] = torch.randn(n, generator=gen, dtype=torch.float64)
        return inputs

    def prepare(x):
        # A non-contiguous view with the same values: (n, rows) storage, transposed.
        return x.transpose(-1, -2).contiguous().transpose(-1, -2) if non_contiguous else x

    if op == "layer_norm":
        e = 1e-5 if eps is None else eps

        def call(backend, x, weight=None, bias=None):
            return layer_norm(prepare(x), n, weight, bias, e, backend=backend)

    else:

        def call(backend, x, weight=None):
            return rms_norm(prepare(x), n, weight, eps, backend=backend)

    grads = (
        ["x"] + (["weight"] if weight else []) + (["bias"] if bias and op == "layer_norm" else [])
    )
    return OpCase(f"{op}[{shape}]", call, make, grad=tuple(grads))


VARIANTS = {
    "no_affine": {"weight": False, "bias": False},
    "weight_only": {"bias": False},
    "scaled_1e4": {"scale": 1e4},
    "zero_variance": {"zero_var": True},
    "non_contiguous": {"non_contiguous": True},
    "batched_3d": {"batch": (3, 5)},
}


# ---- the extension --------------------------------------------------------------------------


def test_extension_builds():
    ok, reason = ext.extension_status()
    assert ok, reason
    info = ext.build_info()
    assert info["cpu"] and info["openmp"]
    assert "norm" in info["op_families"].split(",")
    for name in ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"):
        assert hasattr(torch.ops.turbolm, name)


# ---- cpu backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", CPU_SHAPES)
def test_cpu_matches_reference(built, op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), "cpu", dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_edge_cases(built, op, dtype, variant):
    check_backend(norm_case(op, 5, 129, **VARIANTS[variant]), "cpu", dtype)


@pytest.mark.parametrize("op", OPS)
def test_cpu_float64_matches_reference(built, op):
    check_backend(norm_case(op, 7, 257), "cpu", torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_cpu_gradcheck_float64(built, op):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    if op == "layer_norm":
        fn, args = (lambda x, w, b: layer_norm(x, 7, w, b, backend="cpu")), (x, w, b)
    else:
        fn, args = (lambda x, w: rms_norm(x, 7, w, 1e-6, backend="cpu")), (x, w)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda x: fn(x, *args[1:]), (x,))


def test_cpu_weight_grads_are_deterministic(built):
    """dweight / dbias use fixed row chunks: bitwise equal for any thread count."""
    x = torch.randn(203, 515, requires_grad=True)
    w = torch.randn(515, requires_grad=True)
    b = torch.randn(515, requires_grad=True)
    g = torch.randn(203, 515)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            results.append(
                torch.autograd.grad(layer_norm(x, 515, w, b, backend="cpu"), (x, w, b), g)
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


OPCHECK_CASES = {
    "layer_norm_fwd": lambda x, w, b, dy: [(x, w, b, 1e-5), (x, None, None, 1e-5)],
    "rms_norm_fwd": lambda x, w, b, dy: [(x, w, 1e-6), (x, None, 1e-6)],
    "layer_norm_bwd": lambda x, w, b, dy: [
        (dy, x, w, *torch.ops.turbolm.layer_norm_fwd(x, w, b, 1e-5)[1:], True),
        (dy, x, None, *torch.ops.turbolm.layer_norm_fwd(x, None, None, 1e-5)[1:], False),
    ],
    "rms_norm_bwd": lambda x, w, b, dy: [
        (dy, x, w, torch.ops.turbolm.rms_norm_fwd(x, w, 1e-6)[1]),
        (dy, x, None, torch.ops.turbolm.rms_norm_fwd(x, None, 1e-6)[1]),
    ],
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(built, name, dtype):
    x, dy = torch.randn(5, 33, dtype=dtype), torch.randn(5, 33, dtype=dtype)
    w, b = torch.randn(33, dtype=dtype), torch.randn(33, dtype=dtype)
    for args in OPCHECK_CASES[name](x, w, b, dy):
        torch.library.opcheck(getattr(torch.ops.turbolm, name), args)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from turbolm.nn import LayerNorm, RMSNorm

        self.fc1, self.ln = torch.nn.Linear(16, 32), LayerNorm(32)
        self.fc2, self.rms = torch.nn.Linear(32, 8), RMSNorm(8)

    def forward(self, x):
        return self.rms(self.fc2(torch.relu(self.ln(self.fc1(x)))))


@pytest.mark.parametrize(
    "compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_fullgraph(built, compile_backend):
    torch._dynamo.reset()
    model = _Block()
    x = torch.randn(4, 5, 16)
    with use_backend("cpu"):
        expected = model(x)
        expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


# ---- double backward ------------------------------------------------------------------------


def _kernel_backend_params():
    params = [pytest.param("cpu", id="cpu")]
    if INTERPRET or HAS_CUDA:
        params.append(pytest.param("triton", id="triton"))
    return params


@pytest.mark.parametrize("backend", _kernel_backend_params())
@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises_instead_of_dropping_terms(request, backend, op):
    """A gradient penalty through a kernel backend (create_graph=True, then a gradient of the
    input gradient w.r.t. a weight upstream of the norm) raises BackendError: the kernels'
    backward builds no graph, and the penalty silently lost the norm's second-order terms
    (off by ~100% against torch.nn). First-order gradients under create_graph=True still work."""
    if backend == "cpu":
        request.getfixturevalue("built")
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, device=device)
    weight = torch.randn(8, device=device, requires_grad=True)
    x = torch.randn(4, 8, device=device, requires_grad=True)
    fn = layer_norm if op == "layer_norm" else rms_norm

    def penalty_inputs(name):
        y = fn(lin(x), 8, weight, backend=name)
        (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
        return gx

    gx = penalty_inputs(backend)
    with pytest.raises(BackendError, match=f"{op}: the '{backend}' backend's backward is not"):
        torch.autograd.grad(gx.square().sum(), lin.weight)
    # torch / reference do double backward
    gx = penalty_inputs("torch")
    assert torch.autograd.grad(gx.square().sum(), lin.weight)[0].abs().sum() > 0
    # first-order gradients with create_graph=True: the kernels' values
    y = fn(lin(x), 8, weight, backend=backend)
    grads = torch.autograd.grad(y.square().sum(), (x, weight), create_graph=True)
    y = fn(lin(x), 8, weight, backend="torch")
    for g, e in zip(grads, torch.autograd.grad(y.square().sum(), (x, weight))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


COLD_COMPILE_SCRIPT = """
import torch
import turbolm
from turbolm.nn import LayerNorm, RMSNorm

for backend in ("cpu", "auto"):
    for module in (LayerNorm(16), RMSNorm(16)):
        torch._dynamo.reset()
        x = torch.randn(2, 5, 16, requires_grad=True)
        with turbolm.use_backend(backend):
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
            y = compiled(x)  # the first norm call of this process runs under torch.compile
            y.square().sum().backward()
        if isinstance(module, LayerNorm):
            expected = torch.nn.functional.layer_norm(x, (16,), module.weight, module.bias)
        else:
            expected = torch.nn.functional.rms_norm(x, (16,), module.weight)
        torch.testing.assert_close(y, expected)
print("cold compile ok")
"""


def test_torch_compile_fullgraph_first_call(built):
    """torch.compile(fullgraph=True) of a norm module whose first call in the process is the
    compiled one (the extension built but not loaded yet; nothing selected or looked up yet):
    the backend selection, the extension load and the kernels' first-use lookups ran inside
    the trace (a file lock, an import, filling a cache inside the autograd.Function) and failed
    with 'Unsupported'. A fresh process, so nothing is loaded."""
    assert_fresh_process_prints(COLD_COMPILE_SCRIPT, "cold compile ok")


# ---- typed errors ---------------------------------------------------------------------------


def test_errors_from_the_op_layer(built):
    x = torch.randn(4, 8)
    with pytest.raises(DTypeError, match="x must have dtype"):
        layer_norm(x.long(), 8, backend="cpu")
    with pytest.raises(ShapeError, match=r"weight must have shape \(8,\), got \(7,\)"):
        layer_norm(x, 8, torch.randn(7), backend="cpu")
    with pytest.raises(DeviceError, match="same device"):
        rms_norm(x, 8, torch.randn(8, device="meta"), backend="cpu")
    with pytest.raises(BackendError, match="bias dtype float64 differs from x dtype float32"):
        layer_norm(x, 8, torch.randn(8), torch.randn(8, dtype=torch.float64), backend="cpu")


def test_errors_from_the_cpp_ops_are_typed(built):
    ops = torch.ops.turbolm
    x = torch.randn(4, 8)
    with pytest.raises(
        DTypeError, match=r"^turbolm::layer_norm_fwd: x must have dtype .*got int64$"
    ):
        ext.call(ops.layer_norm_fwd, x.long(), None, None, 1e-5)
    with pytest.raises(ShapeError, match=r"weight must have shape \(8,\), got \(9,\)$"):
        ext.call(ops.layer_norm_fwd, x, torch.randn(9), None, 1e-5)
    with pytest.raises(ShapeError, match="x must have 2 dimensions"):
        ext.call(ops.rms_norm_fwd, x[None], None, 1e-5)
    with pytest.raises(DTypeError, match="weight must have the dtype of x"):
        ext.call(ops.rms_norm_fwd, x, torch.randn(8, dtype=torch.float16), 1e-5)
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-5)
    with pytest.raises(DTypeError, match="mean must have dtype float32, got float64"):
        ext.call(ops.layer_norm_bwd, x, x, None, mean.double(), rstd, False)
    with pytest.raises(ShapeError, match=r"dy must have shape \(4, 8\), got \(4, 9\)"):
        ext.call(ops.rms_norm_bwd, torch.randn(4, 9), x, None, rstd)


def test_named_backend_never_falls_back(built):
    x = torch.randn(4, 8)
    with pytest.raises(BackendError, match="no CUDA device|needs CUDA tensors"):
        layer_norm(x, 8, backend="cuda")
    if not INTERPRET and not HAS_CUDA:
        with pytest.raises(BackendError, match="TRITON_INTERPRET"):
            layer_norm(x, 8, backend="triton")
    with pytest.raises(BackendError, match="differs from x dtype"):
        layer_norm(x.half(), 8, torch.randn(8), backend="cpu")
    with pytest.raises(BackendError, match="float64 is not supported"):
        rms_norm(x.double(), 8, backend="triton")


def test_auto_uses_cpu_only_when_built(built, monkeypatch):
    x = torch.randn(4, 8)
    assert registry.select("layer_norm", "cpu", None, x=x, auto=True).name == "cpu"
    # Not built: auto takes torch (no compiler started); naming cpu would build it.
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_built_cache", False)
    monkeypatch.delenv("TURBOLM_BUILD_EXT", raising=False)
    reason = norm_kernels._cpu_supports(x, auto=True)
    assert reason is not None and "auto does not compile" in reason
    assert registry.select("layer_norm", "cpu", None, x=x, auto=True).name == "torch"


def test_auto_choice_follows_the_extension_state(built, monkeypatch):
    """The op layer caches its backend choice (registry cache_key = norm_kernels.selection_key):
    the key includes whether the extension is built, so auto moves off cpu when it is not."""
    x = torch.randn(4, 8)

    def auto_choice():
        key = norm_kernels.selection_key(x, None, None)
        return registry.select("layer_norm", "cpu", None, cache_key=key, x=x).name

    assert auto_choice() == "cpu"
    assert auto_choice() == "cpu"
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_built_cache", False)
    monkeypatch.delenv("TURBOLM_BUILD_EXT", raising=False)
    assert auto_choice() == "torch"
    unbuilt = norm_kernels.selection_key(x, None, None)
    monkeypatch.setenv("TURBOLM_BUILD_EXT", "1")  # auto may build it now: another slot
    assert norm_kernels.selection_key(x, None, None) != unbuilt
    monkeypatch.undo()
    assert auto_choice() == "cpu"


@pytest.mark.parametrize(
    "backend",
    [
        "cpu",
        "triton",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
        ),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_kernel_backends_shapes_and_graph(request, backend, op):
    """2-D x with 1-D parameters: the op's graph is the one KernelFunction node (no reshape /
    view nodes). x (..., 4, 8) with 2-D parameters: outputs and every gradient in their inputs'
    shapes, with contiguous and expanded (stride 0) upstream gradients. Outputs can be modified
    in place (a view made inside a custom Function could not)."""
    device = {"cpu": "cpu", "triton": triton_device, "cuda": "cuda"}[backend]
    if backend == "cpu":
        request.getfixturevalue("built")

    def run(x, shape, w, b):
        if op == "layer_norm":
            ours = layer_norm(x, shape, w, b, backend=backend)
            return ours, torch.nn.functional.layer_norm(x, shape, w, b)
        return rms_norm(x, shape, w, 1e-6, backend=backend), torch.nn.functional.rms_norm(
            x, shape, w, 1e-6
        )

    for x_shape, shape in (((6, 8), (8,)), ((3, 2, 4, 8), (4, 8))):
        x = torch.randn(x_shape, device=device, requires_grad=True)
        w = (1 + 0.5 * torch.randn(shape, device=device)).requires_grad_()
        b = torch.randn(shape, device=device, requires_grad=True)
        params = (x, w, b) if op == "layer_norm" else (x, w)
        y, ref = run(x, shape, w, b)
        if len(x_shape) == 2:
            assert type(y.grad_fn).__name__ == "KernelFunctionBackward"
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        for dy in (torch.randn_like(y), torch.ones((), device=device).expand_as(y)):
            got = torch.autograd.grad(y, params, dy, retain_graph=True)
            want = torch.autograd.grad(ref, params, dy, retain_graph=True)
            for g, e in zip(got, want):
                assert g.shape == e.shape
                torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        y, ref = run(x, shape, w, b)
        got = torch.autograd.grad(y.mul_(2).sum(), params)
        want = torch.autograd.grad(ref.mul(2).sum(), params)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_auto_skips_unverified_gpu_kernels():
    """On CUDA tensors auto takes neither cuda nor triton until norm_kernels.GPU_AUTO is set
    (after a GPU run verified them); named, they are not refused for that reason."""
    import types

    fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    for supports in (norm_kernels._cuda_supports, norm_kernels._triton_supports):
        assert "not yet verified" in supports(fake, auto=True)
    assert norm_kernels._triton_supports(fake, auto=False) is None


# ---- triton backend (interpreter on CPU tensors without a GPU) ------------------------------

triton_device = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", TRITON_SHAPES)
def test_triton_matches_reference(op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), "triton", dtype, device=triton_device)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_edge_cases(op, variant):
    check_backend(
        norm_case(op, 5, 129, **VARIANTS[variant]), "triton", torch.float32, device=triton_device
    )


@pytest.fixture
def small_loop_blocks(monkeypatch):
    """Make the Triton launchers take their long-row (looped) paths at small N."""
    from turbolm.kernels import norm as kn

    monkeypatch.setattr(kn, "MAX_FUSED_N", 256)
    monkeypatch.setattr(kn, "LOOP_BLOCK_N", 128)
    monkeypatch.setattr(kn, "DW_BLOCK_N", 64)
    monkeypatch.setattr(kn, "DW_BLOCK_R", 4)
    monkeypatch.setattr(kn, "BWD_MAX_FUSED_N", 256)
    monkeypatch.setattr(kn, "COLS_PROGRAMS_PER_SM", 2)
    return kn


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,n", [(1, 257), (9, 769)])
def test_triton_long_row_path(small_loop_blocks, op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), "triton", dtype, device=triton_device)
    check_backend(
        norm_case(op, rows, n, weight=False, bias=False), "triton", dtype, device=triton_device
    )


@pytest.fixture
def small_bwd_tiles(monkeypatch):
    """Make the fused Triton backward use one-row tiles, so every program walks several tiles
    (and prefetches the next one)."""
    from turbolm.kernels import norm as kn

    monkeypatch.setattr(kn, "BWD_TILE_ELEMS", 64)
    return kn


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,n", [(45, 96), (13, 7), (9, 129)])
def test_triton_bwd_row_ranges(small_bwd_tiles, op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), "triton", dtype, device=triton_device)
    check_backend(
        norm_case(op, rows, n, weight=False, bias=False), "triton", dtype, device=triton_device
    )


@pytest.mark.parametrize("op", OPS)
def test_triton_fused_residual_row_ranges(small_bwd_tiles, op):
    check_backend(residual_case(op, 17, 33), "triton", torch.float32, device=triton_device)


def test_triton_bwd_launch_plan(small_bwd_tiles):
    """The fused backward really runs several programs over several tiles with prefetch."""
    kn = small_bwd_tiles
    seen = {}
    original = kn._launch

    def spy(fn, grid, tile, *args, **meta):
        seen.setdefault(fn.__name__ if hasattr(fn, "__name__") else str(fn), []).append(
            (grid, meta)
        )
        return original(fn, grid, tile, *args, **meta)

    x = torch.randn(45, 96, device=triton_device, requires_grad=True)
    w = torch.randn(96, device=triton_device, requires_grad=True)
    try:
        kn._launch = spy
        y = layer_norm(x, 96, w, torch.zeros(96, device=triton_device), backend="triton")
        y.sum().backward()
    finally:
        kn._launch = original
    (grid, meta), *_ = [v[0] for k, v in seen.items() if "bwd_fused" in k]
    assert grid[0] > 1 and meta["PREFETCH"] and meta["BLOCK_R"] == 1


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_rows(backend):
    x = torch.randn(0, 8, device=triton_device, requires_grad=True)
    w = torch.randn(8, device=triton_device, requires_grad=True)
    b = torch.randn(8, device=triton_device, requires_grad=True)
    y = layer_norm(x, 8, w, b, backend=backend)
    assert y.shape == (0, 8)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8, device=triton_device))
    assert torch.equal(db, torch.zeros(8, device=triton_device))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", TRITON_SLOW_SHAPES)
def test_triton_large_shapes(op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), "triton", dtype, device=triton_device)


def test_triton_weight_grads_are_deterministic():
    x = torch.randn(45, 96, device=triton_device, requires_grad=True)
    w = torch.randn(96, device=triton_device, requires_grad=True)
    g = torch.randn(45, 96, device=triton_device)
    first = torch.autograd.grad(rms_norm(x, 96, w, backend="triton"), (x, w), g)
    second = torch.autograd.grad(rms_norm(x, 96, w, backend="triton"), (x, w), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_poison_helper_fills_nan():
    from turbolm.kernels import norm as kn

    assert torch.isnan(kn._new((3, 5), torch.empty(1))).all()


def test_triton_strided_rows():
    """The launchers accept a row stride other than N (last dim contiguous)."""
    from turbolm.kernels import norm as kn

    big = torch.randn(6, 40, device=triton_device)
    x = big[:, :33]  # (6, 33), row stride 40
    w, b = torch.randn(33, device=triton_device), torch.randn(33, device=triton_device)
    y, mean, rstd = kn.layer_norm_fwd(x, w, b, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (33,), w, b, 1e-5))


# ---- fused residual add: y = norm(x + residual), returned with the sum -----------------------


def residual_case(op, rows, n):
    def make(gen):
        inputs = {
            "x": torch.randn(rows, n, generator=gen, dtype=torch.float64),
            "residual": 3 * torch.randn(rows, n, generator=gen, dtype=torch.float64),
            "weight": 1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64),
        }
        if op == "layer_norm":
            inputs["bias"] = torch.randn(n, generator=gen, dtype=torch.float64)
        return inputs

    if op == "layer_norm":

        def call(backend, x, residual, weight, bias):
            return layer_norm(x, n, weight, bias, residual=residual, backend=backend)

        grads = ("x", "residual", "weight", "bias")
    else:

        def call(backend, x, residual, weight):
            return rms_norm(x, n, weight, 1e-6, residual=residual, backend=backend)

        grads = ("x", "residual", "weight")
    return OpCase(f"{op}+residual[{rows}x{n}]", call, make, grad=grads)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,n", [(1, 7), (9, 96), (3, 769)])
def test_triton_fused_residual(op, dtype, rows, n):
    check_backend(residual_case(op, rows, n), "triton", dtype, device=triton_device)


@pytest.mark.parametrize("op", OPS)
def test_triton_fused_residual_long_rows(small_loop_blocks, op):
    check_backend(residual_case(op, 5, 300), "triton", torch.float32, device=triton_device)


@pytest.mark.parametrize("op", OPS)
def test_cpu_residual(built, op):
    check_backend(residual_case(op, 5, 65), "cpu", torch.bfloat16)


def test_residual_is_checked():
    x = torch.randn(4, 8)
    with pytest.raises(ShapeError, match=r"residual must have x's shape \(4, 8\), got \(4, 7\)"):
        layer_norm(x, 8, residual=torch.randn(4, 7))
    with pytest.raises(DTypeError, match="residual=float16"):
        rms_norm(x, 8, residual=torch.randn(4, 8).half())


# ---- GPU: cuda and triton backends on CUDA tensors -------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", GPU_SHAPES)
def test_gpu_matches_reference(backend, op, dtype, rows, n):
    check_backend(norm_case(op, rows, n), backend, dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_edge_cases(backend, op, variant):
    for dtype in DTYPES:
        check_backend(norm_case(op, 5, 1029, **VARIANTS[variant]), backend, dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows,n", [(3, 7), (37, 1024), (5, 32771)])
def test_gpu_residual(backend, op, rows, n):
    check_backend(residual_case(op, rows, n), backend, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@gpu
def test_gpu_cuda_float64_and_unaligned():
    check_backend(norm_case("layer_norm", 9, 4097), "cuda", torch.float64, device="cuda")
    # An odd offset breaks 16-byte alignment: the scalar path.
    base = torch.randn(3 * 1024 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(3, 1024)
    y = layer_norm(x, 1024, backend="cuda")
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (1024,)), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_errors_are_typed():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(DeviceError, match="weight must be on x's device"):
        ext.call(ext.ops().layer_norm_fwd, x, torch.randn(8), None, 1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_weight_grads_are_deterministic(backend):
    x = torch.randn(4099, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    first = torch.autograd.grad(layer_norm(x, 768, w, b, backend=backend), (x, w, b), g)
    second = torch.autograd.grad(layer_norm(x, 768, w, b, backend=backend), (x, w, b), g)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


# ---- GPU: the cuda backend's register path (csrc/norm/norm.cu) ------------------------------
#
# The register path runs when N is a multiple of VEC = 16 / element size and the pointers are
# 16-byte aligned: forward up to 2048 vectors per row (VPT 1 / 2 / 4 at <= 64 / 256 / 2048
# vectors), backward up to 1024 (VPT 1 / 2 at <= 64 / 1024); other shapes take the generic
# path. These shapes sit on both sides of each threshold; rows include 1, counts that do not
# divide the rows per block / per chunk, and more rows than the SMs hold.

CUDA_REG_SHAPES = [
    # (dtype, N): VEC = 8 (2-byte types), 4 (fp32), 2 (fp64)
    (torch.bfloat16, 8),  # 1 vector
    (torch.bfloat16, 512),  # 64 vectors: last VPT 1
    (torch.bfloat16, 520),  # 65: VPT 2
    (torch.bfloat16, 2048),  # 256: last fwd VPT 2
    (torch.bfloat16, 2056),  # 257: fwd VPT 4
    (torch.bfloat16, 4096),  # the benchmark's N
    (torch.bfloat16, 8192),  # 1024: last bwd register size
    (torch.bfloat16, 8200),  # bwd generic, fwd register
    (torch.bfloat16, 16384),  # 2048: last fwd register size
    (torch.bfloat16, 16392),  # generic both ways
    (torch.float16, 768),
    (torch.float16, 4096),
    (torch.float32, 4),
    (torch.float32, 1028),
    (torch.float32, 4096),  # 1024 vectors
    (torch.float32, 4100),  # bwd generic
    (torch.float32, 8192),  # last fwd register size
    (torch.float64, 2),
    (torch.float64, 2048),  # last bwd register size
    (torch.float64, 2050),
    (torch.float64, 4096),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,n", CUDA_REG_SHAPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("rows", [1, 3, 301])
def test_gpu_cuda_register_path_thresholds(op, dtype, n, rows):
    check_backend(norm_case(op, rows, n), "cuda", dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("variant", [*VARIANTS, "bias_only"])
@pytest.mark.parametrize("rows,n", [(37, 4096), (5, 768), (1001, 64)])
def test_gpu_cuda_register_path_variants(op, variant, rows, n):
    """No weight / weight only / bias only / large offsets / a constant row / non-contiguous /
    3-D input on the register path (16-byte aligned N), every dtype."""
    kwargs = {"weight": False} if variant == "bias_only" else VARIANTS[variant]
    for dtype in [*DTYPES, torch.float64]:
        check_backend(norm_case(op, rows, n, **kwargs), "cuda", dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows,n", [(37, 4096), (1001, 768), (3, 8192)])
def test_gpu_cuda_register_path_residual(op, rows, n):
    for dtype in DTYPES:
        check_backend(residual_case(op, rows, n), "cuda", dtype, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows,n", [(8192, 4096), (20000, 1024)])
def test_gpu_cuda_benchmark_sizes(op, rows, n):
    """The benchmark's sizes (more rows than one wave of blocks: several rows per chunk)."""
    check_backend(norm_case(op, rows, n), "cuda", torch.bfloat16, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,n", [(16384, 4096), (4099, 8192), (3001, 520), (777, 8)])
def test_gpu_cuda_weight_grads_are_deterministic(dtype, rows, n):
    """dx, dweight, dbias bitwise equal over repeated runs (register path, fixed-order sums)."""
    x = torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    first = torch.autograd.grad(layer_norm(x, n, w, b, backend="cuda"), (x, w, b), g)
    for _ in range(3):
        again = torch.autograd.grad(layer_norm(x, n, w, b, backend="cuda"), (x, w, b), g)
        for a, c in zip(first, again):
            assert torch.equal(a, c)
    first = torch.autograd.grad(rms_norm(x, n, w, backend="cuda"), (x, w), g)
    again = torch.autograd.grad(rms_norm(x, n, w, backend="cuda"), (x, w), g)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_cuda_unaligned_backward(op):
    """An odd storage offset breaks 16-byte alignment: the generic path, forward and backward,
    must agree with the register path on the same values."""
    base = torch.randn(37 * 1024 + 1, device="cuda", dtype=torch.bfloat16)
    x_odd = base[1:].view(37, 1024).requires_grad_()
    x_al = base[1:].view(37, 1024).clone().requires_grad_()
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(37, 1024, device="cuda", dtype=torch.bfloat16)

    def run(x):
        y = (
            layer_norm(x, 1024, w, backend="cuda")
            if op == "layer_norm"
            else rms_norm(x, 1024, w, backend="cuda")
        )
        return (y, *torch.autograd.grad(y, (x, w), g))

    for got, want in zip(run(x_odd), run(x_al)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


KNOB_SCRIPT = """
import torch
from tests.harness import check_backend
from tests.test_norm_kernels import norm_case, residual_case
from turbolm.ops import layer_norm

for op in ("layer_norm", "rms_norm"):
    for rows, n in ((301, 4096), (37, 8192), (5, 768), (3, 16384)):
        for dtype in (torch.bfloat16, torch.float32):
            check_backend(norm_case(op, rows, n), "cuda", dtype, device="cuda")
    check_backend(residual_case(op, 37, 4096), "cuda", torch.bfloat16, device="cuda")
x = torch.randn(4099, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
b = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(x)
first = torch.autograd.grad(layer_norm(x, 4096, w, b, backend="cuda"), (x, w, b), g)
again = torch.autograd.grad(layer_norm(x, 4096, w, b, backend="cuda"), (x, w, b), g)
assert all(torch.equal(p, q) for p, q in zip(first, again))
print("knobs ok")
"""


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "env",
    [
        {"TURBOLM_NORM_REG": "0"},
        {"TURBOLM_NORM_REG": "1"},
        {"TURBOLM_NORM_REG": "1", "TURBOLM_NORM_BWD_AHEAD": "2"},
        {"TURBOLM_NORM_REG": "1", "TURBOLM_NORM_FWD_VPT": "2", "TURBOLM_NORM_BWD_VPT": "1"},
        {"TURBOLM_NORM_REG": "1", "TURBOLM_NORM_FWD_VPT": "1", "TURBOLM_NORM_BWD_VPT": "2"},
    ],
    ids=["generic_only", "register", "bwd_ahead_2", "fwd2_bwd1", "fwd1_bwd2"],
)
def test_gpu_cuda_benchmark_knobs(env):
    """The layouts bench_norm can select through the environment (read once per process, so
    each runs in its own process) are correct and deterministic too."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", KNOB_SCRIPT],
        env={**os.environ, **env, "TURBOLM_POISON_OUTPUTS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and "knobs ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )


PATH_SCRIPT = """
import json
import torch
from turbolm.ops import layer_norm, norm_kernels

def grads(n):
    x = torch.randn(64, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer_norm(x, n, w, b, backend="cuda")
    torch.autograd.grad(y, (x, w, b), torch.randn_like(y))

grads(4096)  # loads the extension
before = norm_kernels.cuda_stats()
grads(4096)  # 16-byte vectors, N within the register path's limits
grads(4097)  # N not a multiple of the vector width: always the generic path
after = norm_kernels.cuda_stats()
print("PATHS" + json.dumps({k: after[k] - before[k] for k in after}))
"""


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reg", ["0", "1"])
def test_gpu_cuda_path_taken(reg):
    """TURBOLM_NORM_REG=1 sends an eligible row length to the register kernels (forward and
    backward) and an odd one to the generic kernels; without it everything stays generic."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", PATH_SCRIPT],
        env={**os.environ, "TURBOLM_NORM_REG": reg},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and "PATHS" in result.stdout, result.stderr[-4000:]
    did = json.loads(result.stdout.split("PATHS", 1)[1])
    on = int(reg)
    assert did == {
        "fwd_register": on, "fwd_generic": 2 - on, "bwd_register": on, "bwd_generic": 2 - on,
    }, did  # fmt: skip


# ---- convergence: a small Transformer trained with the cpu kernels vs the reference ------------


def _train_losses(norm_backend: str, norm: str, steps: int = 50) -> list[float]:
    from turbolm.models.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=96, context=32, n_layer=2, n_head=4, d_model=64, norm=norm, bias=True
    )
    model = TransformerLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 96, (8, 33), generator=gen)
    losses = []
    with use_backend({"layer_norm": norm_backend, "rms_norm": norm_backend}):
        for _ in range(steps):
            _, loss = model(data[:, :-1], data[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_convergence_cpu_kernels_match_reference(built, norm):
    try:
        import turbolm.models.transformer  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"TransformerLM not available yet: {exc}")
    ref = _train_losses("reference", norm)
    got = _train_losses("cpu", norm)
    assert ref[-1] < ref[0] - 0.5, "the reference run did not learn"
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-4, f"step {step}: cpu loss {a:.6f} vs reference {b:.6f}"
