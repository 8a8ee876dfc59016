"""RNN kernel backends (``cpu``; ``cuda`` and ``triton`` on a GPU / under the interpreter)
against the fp64 reference, through the shared harness: outputs, final states and every
gradient (input, initial states, each weight).

The ``cpu`` tests build the C++ extension on first use (about a minute; cached afterwards).
Every C++ output is poisoned with NaN before the kernels run (TURBOLM_POISON_OUTPUTS=1), so an
element a kernel forgets to write fails the harness's finiteness check. The CUDA sources are
compiled and linked by tests/test_ext.py::test_cuda_sources_compile_and_link (all op families).
"""

from __future__ import annotations

import itertools
import os

import torch

if not torch.cuda.is_available():  # Triton on CPU tensors: the interpreter (before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.harness import assert_fresh_process_prints, check_backend  # noqa: E402
from tests.test_ops_rnn import (  # noqa: E402
    BF16_ATOL,
    MODES,
    RELU_BF16_SKIP,
    cell_case,
    random_lengths,
    seq_case,
)
from turbolm import ext  # noqa: E402
from turbolm.errors import BackendError, ShapeError  # noqa: E402
from turbolm.ops import registry, rnn_kernels  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("TURBOLM_POISON_OUTPUTS", "1")


@pytest.fixture(scope="module")
def built():
    """The C++ extension with the RNN ops; skips the cpu tests if it cannot be built
    (test_extension_builds_with_rnn_ops then fails with the reason)."""
    if ext.load_extension() is None:
        pytest.skip(f"C++ extension unavailable: {ext.extension_status(build=False)[1]}")
    return rnn_kernels.ops()


def test_extension_builds_with_rnn_ops():
    assert ext.load_extension() is not None, ext.extension_status(build=False)[1]
    ops = rnn_kernels.ops()
    for name in ("rnn_layer_fwd", "rnn_layer_bwd", "rnn_cell_fwd", "rnn_cell_bwd"):
        assert hasattr(ops, name)


# --- the sweep: mode x layers x direction x batch x seq x hidden x initial state -------------

SWEEP = list(
    itertools.product(MODES, (1, 3), (False, True), (1, 5), (1, 7), (1, 33), (False, True))
)


@pytest.mark.parametrize(
    "mode,layers,bidirectional,batch,steps,hidden,with_hx",
    SWEEP,
    ids=[
        f"{m}-L{ly}-{'bi' if bi else 'uni'}-B{b}-T{t}-H{h}-{'hx' if hx else 'nohx'}"
        for m, ly, bi, b, t, h, hx in SWEEP
    ],
)
def test_cpu_sweep(built, mode, layers, bidirectional, batch, steps, hidden, with_hx):
    case = seq_case(mode, layers, bidirectional, batch, steps, hidden, with_hx=with_hx)
    check_backend(case, "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers", (1, 3))
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("hidden", (1, 33))
def test_cpu_variable_lengths(built, mode, layers, bidirectional, hidden):
    case = seq_case(mode, layers, bidirectional, 5, 7, hidden, lengths=True, with_hx=layers == 3)
    check_backend(case, "cpu", torch.float32)


@pytest.mark.parametrize("layers", (1, 3))
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("lengths", (False, True))
@pytest.mark.parametrize("hidden,proj_size", ((33, 5), (2, 1)))
def test_cpu_lstm_projection(built, layers, bidirectional, lengths, hidden, proj_size):
    case = seq_case(
        "lstm", layers, bidirectional, 5, 7, hidden, proj_size=proj_size, lengths=lengths
    )
    check_backend(case, "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_layouts(built, mode):
    """No bias, batch_first (a non-contiguous time-major view) and unbatched input."""
    for case in (
        seq_case(mode, 2, True, 4, 5, 6, bias=False),
        seq_case(mode, 2, True, 4, 5, 6, batch_first=True, lengths=True),
        seq_case(mode, 2, True, 1, 5, 6, unbatched=True),
        seq_case(mode, 2, False, 1, 5, 6, unbatched=True, with_hx=False),
        seq_case(mode, 1, True, 6, 4, 3, lengths=True, bias=False),
    ):
        check_backend(case, "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_threads_and_gemm_tiles(built, mode):
    """Two threads (OpenMP over GEMM tiles and batch rows), batches above one 64-row GEMM tile
    and gate counts that end in a partial 64-column tile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        proj_size = 24 if mode == "lstm" else 0
        check_backend(seq_case(mode, 1, True, 70, 3, 40, lengths=True), "cpu", torch.float32)
        case = seq_case(mode, 1, False, 64, 2, 128, proj_size=proj_size)
        check_backend(case, "cpu", torch.float32)
    finally:
        torch.set_num_threads(threads)


def test_cpu_empty_batch(built):
    from turbolm.ops.rnn import lstm

    module = torch.nn.LSTM(3, 4)
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, (h, c) = lstm(x, None, module._flat_weights, num_layers=1, backend="cpu")
    assert out.shape == (5, 0, 4) and h.shape == (1, 0, 4)
    (grad,) = torch.autograd.grad(out.sum() + h.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("mode", MODES)
def test_cpu_float64(built, mode):
    proj_size = 3 if mode == "lstm" else 0
    case = seq_case(mode, 2, True, 5, 6, 9, lengths=True, proj_size=proj_size)
    check_backend(case, "cpu", torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_cpu_half_precision(built, mode, dtype):
    """float16 / bfloat16 compute in float32 inside: within the bound of the reference run in
    the same dtype (which also computes in float32)."""
    if mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    case = seq_case(mode, 2, True, 3, 5, 8, lengths=True)
    case.atol = BF16_ATOL
    check_backend(case, "cpu", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_cpu_large(built, mode):
    case = seq_case(mode, 2, True, 16, 64, 129, lengths=True, proj_size=31 if mode == "lstm" else 0)
    check_backend(case, "cpu", torch.float32)


# --- cells ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,hidden", ((1, 1), (5, 33)))
@pytest.mark.parametrize("with_hx", (False, True))
@pytest.mark.parametrize("bias", (False, True))
def test_cpu_cells(built, mode, batch, hidden, with_hx, bias):
    check_backend(cell_case(mode, batch, hidden, with_hx=with_hx, bias=bias), "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_cells_unbatched_float64_bfloat16(built, mode):
    check_backend(cell_case(mode, 1, 7, unbatched=True), "cpu", torch.float32)
    check_backend(cell_case(mode, 3, 7), "cpu", torch.float64)
    if mode == "rnn_relu":
        return  # RELU_BF16_SKIP
    case = cell_case(mode, 4, 7)
    case.atol = BF16_ATOL
    check_backend(case, "cpu", torch.bfloat16)


def test_cpu_cell_with_one_bias_only(built):
    """torch's cells take both biases or none; the op accepts one alone (the other is zero)."""
    from turbolm.ops.rnn import gru_cell

    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(3, 4, generator=gen), torch.randn(3, 5, generator=gen)
    w_ih, w_hh = torch.randn(15, 4, generator=gen), torch.randn(15, 5, generator=gen)
    b = torch.randn(15, generator=gen, requires_grad=True)
    ref = gru_cell(x, h, w_ih, w_hh, None, b, backend="reference")
    out = gru_cell(x, h, w_ih, w_hh, None, b, backend="cpu")
    torch.testing.assert_close(out, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), b)
    (g_out,) = torch.autograd.grad(out.sum(), b)
    torch.testing.assert_close(g_out, g_ref)


# --- gradcheck (float64) ------------------------------------------------------------------------


def _gradcheck(case, backend):
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    names = list(case.grad)
    fixed = {k: v for k, v in inputs.items() if k not in names}
    if "relu" in case.name:
        # Keep pre-activations away from relu's kink, where finite differences are not a gradient.
        inputs = {
            k: v.abs() + 0.1 if k.startswith(("weight", "bias", "x", "h")) else v
            for k, v in inputs.items()
        }
    tensors = tuple(inputs[n].requires_grad_(True) for n in names)

    def fn(*args):
        return case.call(backend, **dict(zip(names, args)), **fixed)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", (False, True))
def test_cpu_gradcheck(built, mode, lengths):
    proj_size = 1 if mode == "lstm" else 0
    _gradcheck(seq_case(mode, 2, True, 3, 3, 2, proj_size=proj_size, lengths=lengths), "cpu")


@pytest.mark.parametrize("mode", MODES)
def test_cpu_cell_gradcheck(built, mode):
    _gradcheck(cell_case(mode, 3, 4), "cpu")


# --- semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cpu_lengths_match_truncated_sequences(built, mode):
    """Each sequence run alone, truncated to its length, gives the same outputs and states;
    padded outputs are exactly zero."""
    case = seq_case(mode, 2, True, 5, 6, 5, lengths=True)
    inputs = case.make_inputs(torch.Generator().manual_seed(1))
    inputs["lengths"] = torch.tensor([3, 6, 1, 6, 2])  # unsorted, with ties
    out, *states = case.call("cpu", **inputs)
    for b, n in enumerate(inputs["lengths"].tolist()):
        alone = dict(inputs, x=inputs["x"][:n, b : b + 1], lengths=None)
        alone["h0"] = inputs["h0"][:, b : b + 1]
        if mode == "lstm":
            alone["c0"] = inputs["c0"][:, b : b + 1]
        ref_out, *ref_states = case.call("cpu", **alone)
        torch.testing.assert_close(out[:n, b : b + 1], ref_out)
        assert (out[n:, b] == 0).all()
        for s, r in zip(states, ref_states):
            torch.testing.assert_close(s[:, b : b + 1], r)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_torch_nn(built, mode):
    """The drop-in module on the cpu backend against torch.nn with the same weights."""
    from turbolm.nn.rnn import GRU, LSTM, RNN
    from turbolm.ops import use_backend

    kinds = {"lstm": (LSTM, torch.nn.LSTM, {}), "gru": (GRU, torch.nn.GRU, {})}
    kinds["rnn_tanh"] = (RNN, torch.nn.RNN, {})
    kinds["rnn_relu"] = (RNN, torch.nn.RNN, {"nonlinearity": "relu"})
    ours_cls, torch_cls, kwargs = kinds[mode]
    torch.manual_seed(0)
    ref = torch_cls(4, 6, 2, bidirectional=True, batch_first=True, **kwargs)
    ours = ours_cls(4, 6, 2, bidirectional=True, batch_first=True, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 4)
    with use_backend("cpu"):
        out, _ = ours(x)
    torch.testing.assert_close(out, ref(x)[0], atol=1e-5, rtol=1e-5)


def test_cpu_padded_steps_are_never_computed(built):
    """The batch runs in decreasing-length order and each step only on the rows still running:
    a NaN in a padded input step reaches neither outputs, states nor the input gradient.
    (Weight gradients are single GEMMs over all steps with zero gradients at padded steps, so
    padded inputs must be finite, as zero padding is.)"""
    from turbolm.ops.rnn import lstm

    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 4)
    x = torch.randn(5, 3, 3)
    x[3:, 1] = float("nan")
    x.requires_grad_(True)
    lengths = torch.tensor([5, 3, 4])
    out, (h, c) = lstm(x, None, module._flat_weights, num_layers=1, lengths=lengths, backend="cpu")
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    assert (out[3:, 1] == 0).all()
    (grad,) = torch.autograd.grad(out.sum() + h.sum(), x)
    assert torch.isfinite(grad[:3]).all() and (grad[3:, 1] == 0).all()


# --- the registered ops ------------------------------------------------------------------------


def _layer_args(mode, dtype, *, lengths, proj_size=0, bidirectional=True, bias=True):
    gen = torch.Generator().manual_seed(3)
    steps, batch, inp, hidden = 4, 3, 5, 6
    dirs, out = (2 if bidirectional else 1), proj_size or hidden
    gates = rnn_kernels.GATES[mode] * hidden

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    weights = []
    for _ in range(dirs):
        weights += [rnd(gates, inp), rnd(gates, out)]
        weights += [rnd(gates), rnd(gates)] if bias else []
        weights += [rnd(proj_size, hidden)] if proj_size else []
    x, h0 = rnd(steps, batch, inp), rnd(dirs, batch, out)
    c0 = rnd(dirs, batch, hidden) if mode == "lstm" else None
    lens = random_lengths(gen, batch, steps) if lengths else None
    return (x, h0, c0, lens, weights, mode, proj_size, bias, bidirectional)


OPCHECK_LAYERS = [
    ("lstm", {"lengths": True, "proj_size": 2}),
    ("gru", {"lengths": True}),
    ("rnn_tanh", {"lengths": False, "bidirectional": False, "bias": False}),
]


@pytest.mark.parametrize("mode,kwargs", OPCHECK_LAYERS, ids=[m for m, _ in OPCHECK_LAYERS])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_opcheck_layer_ops(built, mode, kwargs, dtype):
    args = _layer_args(mode, dtype, **kwargs)
    torch.library.opcheck(built.rnn_layer_fwd, args)
    x, h0, c0, lens, weights, mode, proj_size, bias, bidirectional = args
    y, h_n, c_n, ws, hprev, hraw = built.rnn_layer_fwd(*args)
    dc_n = torch.randn_like(c_n) if mode == "lstm" else None
    bwd_args = (
        torch.randn_like(y),
        torch.randn_like(h_n),
        dc_n,
        x,
        h0,
        c0,
        lens,
        weights,
        ws,
        hprev,
        hraw,
        mode,
        proj_size,
        bias,
        bidirectional,
    )
    torch.library.opcheck(built.rnn_layer_bwd, bwd_args)
    # absent output gradients (None) are zeros
    torch.library.opcheck(built.rnn_layer_bwd, (None, None, None) + bwd_args[3:])


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_cell_ops(built, mode):
    gen = torch.Generator().manual_seed(4)
    gates = rnn_kernels.GATES[mode] * 5
    x, h = torch.randn(3, 4, generator=gen), torch.randn(3, 5, generator=gen)
    c = torch.randn(3, 5, generator=gen) if mode == "lstm" else None
    w_ih, w_hh = torch.randn(gates, 4, generator=gen), torch.randn(gates, 5, generator=gen)
    b_ih, b_hh = torch.randn(gates, generator=gen), torch.randn(gates, generator=gen)
    args = (x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
    torch.library.opcheck(built.rnn_cell_fwd, args)
    h1, c1, ws, hprev = built.rnn_cell_fwd(*args)
    dc = torch.randn_like(c1) if mode == "lstm" else None
    torch.library.opcheck(
        built.rnn_cell_bwd,
        (torch.randn_like(h1), dc, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev, mode),
    )
    torch.library.opcheck(
        built.rnn_cell_bwd, (None, None, x, h, c, w_ih, w_hh, None, None, ws, hprev, mode)
    )


@pytest.mark.parametrize(
    "compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_fullgraph(built, compile_backend):
    """The functional op with the cpu backend compiles without graph breaks (the fake
    implementations give the shapes), forward and backward. (Dynamo refuses nn.LSTM
    subclasses themselves unless torch._dynamo.config.allow_rnn is set.)"""
    from turbolm.ops import use_backend
    from turbolm.ops.rnn import lstm

    torch._dynamo.reset()
    torch.manual_seed(0)
    weights = [w.detach().requires_grad_(True) for w in torch.nn.LSTM(4, 6, 2)._flat_weights]
    x = torch.randn(3, 5, 4)

    def fn(x, *weights):
        out, (h, c) = lstm(x, None, list(weights), num_layers=2, batch_first=True)
        return out.square().sum() + h.sum() + c.sum()

    with use_backend("cpu"):
        expected = fn(x, *weights)
        expected_grads = torch.autograd.grad(expected, weights)
        compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
        out = compiled(x, *weights)
        grads = torch.autograd.grad(out, weights)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_typed_errors_from_the_ops(built):
    x, h0, c0, lens, weights, *rest = _layer_args("lstm", torch.float32, lengths=False)
    with pytest.raises(ShapeError, match=r"h0 must have shape \(2, 3, 6\), got \(2, 3, 5\)"):
        ext.call(built.rnn_layer_fwd, x, h0[..., :5], c0, lens, weights, *rest)
    with pytest.raises(ShapeError, match=r"weights\[0\] must have shape"):
        ext.call(built.rnn_layer_fwd, x, h0, c0, lens, [weights[0][:, :2]] + weights[1:], *rest)
    with pytest.raises(Exception, match="lengths must be in"):
        ext.call(built.rnn_layer_fwd, x, h0, c0, torch.tensor([1, 9, 2]), weights, *rest)


@pytest.mark.parametrize("backend", ["cpu", "triton"] if HAS_CUDA or INTERPRET else ["cpu"])
@pytest.mark.parametrize("mode", ("lstm", "gru_cell"))
def test_double_backward_raises_instead_of_dropping_terms(request, backend, mode):
    """create_graph=True through a kernel backend, then a gradient of the input gradient (a
    gradient penalty): BackendError, not the silently incomplete second derivative (the
    kernels' backward builds no graph). First-order gradients under create_graph still work."""
    from turbolm.nn import LSTM, GRUCell

    if backend == "cpu":
        request.getfixturevalue("built")
    device = "cuda" if HAS_CUDA and backend == "triton" else "cpu"
    torch.manual_seed(0)
    module = (LSTM(4, 5, num_layers=2) if mode == "lstm" else GRUCell(4, 5)).to(device)
    x = torch.randn(3, 2, 4, device=device, requires_grad=True)
    if mode != "lstm":
        x = x[0].detach().requires_grad_()

    def run(name):
        with registry.use_backend(name):
            out = module(x)
        return (out[0] if mode == "lstm" else out).sum()

    (gx,) = torch.autograd.grad(run(backend), x, create_graph=True)
    with pytest.raises(BackendError, match=f"the '{backend}' backend's backward is not"):
        torch.autograd.grad(gx.square().sum(), next(module.parameters()))
    (gx,) = torch.autograd.grad(run("torch"), x, create_graph=True)  # torch: supported
    torch.autograd.grad(gx.square().sum(), next(module.parameters()))
    got = torch.autograd.grad(run(backend), list(module.parameters()), create_graph=True)
    want = torch.autograd.grad(run("torch"), list(module.parameters()))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


COLD_COMPILE_SCRIPT = """
import torch
import turbolm
from turbolm.nn import GRUCell, LSTMCell
from turbolm.ops.rnn import gru

for backend in ("cpu", "auto"):
    torch._dynamo.reset()
    cell = LSTMCell(3, 4)
    x = torch.randn(2, 3, requires_grad=True)
    with turbolm.use_backend(backend):
        h, c = torch.compile(cell, fullgraph=True, backend="aot_eager")(x)
        (h.sum() + c.sum()).backward()
    torch.testing.assert_close(h, torch.nn.LSTMCell.forward(cell, x)[0])
module = torch.nn.GRU(3, 4)
lengths = torch.tensor([3, 1])

def run(x, *weights):
    return gru(x, None, list(weights), num_layers=1, lengths=lengths, backend="cpu")

x = torch.randn(3, 2, 3)
out, h_n = torch.compile(run, fullgraph=True, backend="aot_eager")(x, *module._flat_weights)
torch.testing.assert_close(out, run(x, *module._flat_weights)[0])
print("cold compile ok")
"""


def test_torch_compile_fullgraph_first_call(built):
    """torch.compile(fullgraph=True) where the compiled call is the process's first RNN call
    (the extension built but not loaded): the selection loaded the extension inside the trace
    (file I/O, a lock) and failed with 'Unsupported'. A fresh process, so nothing is loaded."""
    assert_fresh_process_prints(COLD_COMPILE_SCRIPT, "cold compile ok")


# --- backend selection -------------------------------------------------------------------------


def test_explicit_backends_explain_why_they_cannot_run(built):
    from turbolm.ops.rnn import gru

    x, w = torch.randn(3, 2, 4), list(torch.nn.GRU(4, 5)._flat_weights)
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="'cuda'.*no CUDA device"):
            gru(x, None, w, num_layers=1, backend="cuda")
    cpu = registry.registered("gru")["cpu"]
    assert "dtype int32 is not supported" in cpu.why_not(input=x.int(), weights=w)
    assert "time-major" in cpu.why_not(input=x[0], weights=w)
    assert cpu.why_not(input=x, weights=w) is None


def test_auto_uses_cpu_only_when_built(built, monkeypatch):
    x, w = torch.randn(3, 2, 4), list(torch.nn.GRU(4, 5)._flat_weights)
    assert registry.select("gru", "cpu", None, input=x, weights=w).name == "cpu"
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_built_cache", False)
    monkeypatch.delenv("TURBOLM_BUILD_EXT", raising=False)
    assert registry.select("gru", "cpu", None, input=x, weights=w).name == "torch"
    reason = registry.registered("gru")["cpu"].why_not(input=x, weights=w)
    assert reason is not None and "auto does not compile" in reason


def test_explicit_request_may_build_auto_may_not(built, monkeypatch):
    """select() tells the cpu backend whether it was named (may compile) or tried by auto."""
    x, w = torch.randn(3, 2, 4), list(torch.nn.GRU(4, 5)._flat_weights)
    seen = []
    monkeypatch.setattr(ext, "is_built", lambda: False)
    monkeypatch.setattr(rnn_kernels, "_ext_reason", lambda auto, ok: seen.append(auto) or "no")
    monkeypatch.delenv("TURBOLM_BUILD_EXT", raising=False)
    with pytest.raises(BackendError):
        registry.select("gru", "cpu", "cpu", input=x, weights=w)
    assert registry.select("gru", "cpu", None, input=x, weights=w).name == "torch"
    assert seen == [False, True]


# --- convergence -----------------------------------------------------------------------------


def _train_losses(cell, backend, steps=100, device="cpu"):
    from turbolm.models.rnn import RNNLM, RNNConfig
    from turbolm.ops import use_backend

    torch.manual_seed(0)
    model = RNNLM(
        RNNConfig(vocab_size=24, cell=cell, n_layer=2, d_embed=12, d_hidden=16, context=12)
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 24, (steps, 4, 13), generator=gen)
    data[:, :, 1::2] = (data[:, :, 0::2][:, :, : data[:, :, 1::2].shape[-1]] * 5 + 3) % 24
    data = data.to(device)
    losses = []
    with use_backend({"lstm": backend, "gru": backend}):
        for batch in data:
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_rnnlm_converges_like_reference(built, cell):
    ref = _train_losses(cell, "reference")
    ours = _train_losses(cell, "cpu")
    assert ref[-1] < ref[0] - 0.2  # it learns
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-3, atol=1e-4)


# --- GPU ---------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32():
    """fp32 GEMMs in full precision for the test (restored afterwards). Not monkeypatch:
    torch.backends.cuda.matmul.allow_tf32 is served by __getattr__, and monkeypatch's undo
    then fails with AttributeError (seen with torch 2.14)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = saved


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gpu_backends(backend, mode, dtype, no_tf32):
    if dtype == torch.bfloat16 and mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    for lengths in (False, True):
        proj_size = 5 if mode == "lstm" else 0
        for case in (
            seq_case(mode, 2, True, 5, 7, 33, lengths=lengths, proj_size=proj_size),
            seq_case(mode, 1, False, 64, 20, 256, lengths=lengths),
        ):
            case.atol = BF16_ATOL
            check_backend(case, backend, dtype, device="cuda")
    cell = cell_case(mode, 5, 33)
    cell.atol = BF16_ATOL
    check_backend(cell, backend, dtype, device="cuda")


# The CUDA time-loop variants (rnn.cu "variants"), "strict": a variant that should run but
# cannot raises instead of falling back. Sizes around the persistent kernel's limit (H <= 256)
# and its batch tiling (32 / 64 / 128 rows); projections and variable lengths, which the
# persistent kernel leaves to the loop (and graphs leave projections to the loop), must still
# be right. Graph runs call each case twice: the first call of given sizes is the plain
# warm-up, the second captures (and a repeat with the same buffers replays).
GPU_VARIANTS = ("graph", "persistent", "persistent,graph")
# The harness sweep runs the two that cover every code path ("persistent" alone is the same
# forward as "persistent,graph" with the plain backward); test_gpu_cuda_variants_match_loop
# runs all three.
HARNESS_VARIANTS = ("graph", "persistent,graph")


def _variant_cases(mode):
    proj = 5 if mode == "lstm" else 0
    return (
        seq_case(mode, 2, True, 5, 7, 33),
        seq_case(mode, 2, True, 5, 7, 33, lengths=True, proj_size=proj),
        seq_case(mode, 1, False, 5, 6, 33, lengths=True),
        seq_case(mode, 1, False, 70, 9, 256),
        seq_case(mode, 1, False, 300, 3, 128, with_hx=False),
        seq_case(mode, 1, False, 300, 4, 256),  # the persistent kernel's 4-row-group tiling
        seq_case(mode, 1, False, 3, 5, 257),
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", HARNESS_VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_gpu_cuda_variants(variant, mode, dtype, no_tf32):
    if dtype != torch.float32 and mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    repeats = 2 if "graph" in variant else 1
    with rnn_kernels.cuda_variant(variant + ",strict"):
        for case in _variant_cases(mode):
            case.atol = BF16_ATOL
            for _ in range(repeats):
                check_backend(case, "cuda", dtype, device="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("mode", ("lstm", "gru"))
def test_gpu_cuda_variants_match_loop(variant, mode, no_tf32):
    """Repeated forward + backward of one module (the graph path replays from the third call)
    against the plain loop on the same inputs: outputs, states and every gradient; and the
    variant really ran (rnn_kernels.cuda_stats)."""
    RUNS = 6
    import turbolm
    import turbolm.nn

    torch.manual_seed(0)
    cls = turbolm.nn.LSTM if mode == "lstm" else turbolm.nn.GRU
    module = cls(48, 128, num_layers=2, bidirectional=True).cuda()
    x = torch.randn(16, 32, 48, device="cuda", requires_grad=True)
    dy = torch.randn(16, 32, 256, device="cuda")

    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with turbolm.use_backend("cuda"):
            y, state = module(x)
        h = state[0] if mode == "lstm" else state
        (y * dy).sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        return [y.detach().clone(), h.detach().clone()] + grads

    with rnn_kernels.cuda_variant("loop"):
        expected = run()
    before = rnn_kernels.cuda_stats()
    with rnn_kernels.cuda_variant(variant + ",strict"):
        for _ in range(RUNS):
            got = run()
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    after = rnn_kernels.cuda_stats()
    did = {k: after[k] - before[k] for k in after}
    loops = RUNS * 2 * 2  # runs x layers x directions
    if "persistent" in variant:
        assert did["persistent_launches"] == loops and did["persistent_refusals"] == 0, did
    if "graph" in variant:
        # same buffers from one run to the next (caching allocator): later runs replay
        assert did["graph_fallbacks"] == 0 and did["graph_replays"] > 0, did


def test_cuda_variant_switch():
    """The Python switch sets what rnn.cu reads, validates names and restores the old value."""
    old = os.environ.get(rnn_kernels.CUDA_VARIANT_ENV)
    with rnn_kernels.cuda_variant("persistent+graph"):
        assert os.environ[rnn_kernels.CUDA_VARIANT_ENV] == "persistent,graph"
        assert rnn_kernels.get_cuda_variant() == "persistent,graph"
    assert os.environ.get(rnn_kernels.CUDA_VARIANT_ENV) == old
    with pytest.raises(ValueError, match="unknown CUDA RNN variant"):
        rnn_kernels.set_cuda_variant("fast")
    stats = rnn_kernels.cuda_stats()  # None without the CUDA part of the extension
    assert stats is None or set(stats) == set(rnn_kernels.CUDA_STATS)


def test_release_cuda_caches(built):
    """The release op exists in CUDA builds and runs without a GPU (nothing cached: no CUDA
    call); None when the extension has no CUDA part."""
    released = rnn_kernels.release_cuda_caches()
    if ext.load_extension().build_info()["cuda"]:
        assert set(released) == {"graphs", "handles"}
        assert all(isinstance(v, int) and v >= 0 for v in released.values()), released
    else:
        assert released is None


# The graph cache's cap (csrc/rnn/rnn.cu graphs::kMaxEntries).
GRAPH_CACHE_CAP = 64


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_caches_bounded_and_released(no_tf32):
    """The graph variant keeps no GPU buffer between calls (its cuBLAS workspace is per call),
    caches at most GRAPH_CACHE_CAP graphs per process (least recently used evicted),
    release_cuda_caches() destroys them all (the next call warms up and captures again, with
    the same results), and threads that exit hand their cuBLAS handles on (no handle per
    thread ever created)."""
    import threading
    import time

    import turbolm
    import turbolm.nn

    torch.manual_seed(0)
    module = turbolm.nn.GRU(8, 16).cuda()

    def run(batch, x=None):
        x = torch.randn(3, batch, 8, device="cuda") if x is None else x  # (T, B, I)
        with torch.no_grad(), turbolm.use_backend("cuda"):
            return module(x)[0]

    def delta(before):
        after = rnn_kernels.cuda_stats()
        return {k: after[k] - before[k] for k in after}

    run(1)  # whatever the module or torch allocate once, before measuring
    rnn_kernels.release_cuda_caches()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    before = rnn_kernels.cuda_stats()
    sizes = GRAPH_CACHE_CAP + 6
    with rnn_kernels.cuda_variant("graph,strict"):
        for batch in range(1, sizes + 1):  # one graph per batch size: warm-up, then capture
            run(batch)
            run(batch)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated  # no workspace or buffer kept
    did = delta(before)
    assert did["graph_fallbacks"] == 0 and did["graph_captures"] == sizes, did
    assert did["graph_evictions"] == sizes - GRAPH_CACHE_CAP, did
    assert rnn_kernels.release_cuda_caches()["graphs"] == GRAPH_CACHE_CAP

    x = torch.randn(3, 4, 8, device="cuda")
    with rnn_kernels.cuda_variant("loop"):
        expected = run(4, x)
    before = rnn_kernels.cuda_stats()
    with rnn_kernels.cuda_variant("graph,strict"):
        for _ in range(4):
            torch.testing.assert_close(run(4, x), expected, rtol=1e-5, atol=1e-6)
    did = delta(before)
    assert did["graph_warmups"] == 1 and did["graph_captures"] >= 1, did
    assert did["graph_replays"] > 0, did  # same buffers from one call to the next

    rnn_kernels.release_cuda_caches()
    run(5)  # the main thread takes a handle again
    for _ in range(8):
        worker = threading.Thread(target=run, args=(5,))
        worker.start()
        worker.join()
        time.sleep(0.05)  # the thread's C++ thread-locals go after Python's join returns
    handles = rnn_kernels.release_cuda_caches()["handles"]
    assert 1 <= handles <= 3, handles  # the main thread's and the one the workers passed on


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("cell", ("lstm", "gru"))
def test_gpu_rnnlm_converges_like_reference(backend, cell):
    torch.manual_seed(0)
    ref = _train_losses(cell, "reference", device="cuda")
    ours = _train_losses(cell, backend, device="cuda")
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-3, atol=1e-4)


# --- Triton (interpreter on CPU; a GPU runs test_gpu_backends) ---------------------------------

requires_triton_cpu = pytest.mark.skipif(
    HAS_CUDA or not rnn_kernels.triton_interpreting() or rnn_kernels._triton_available(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 and no GPU (GPU: test_gpu_backends)",
)


@requires_triton_cpu
@pytest.mark.parametrize("mode", MODES)
def test_triton_interpreter(mode):
    """Tiny shapes: every program of the interpreter runs in Python."""
    proj_size = 4 if mode == "lstm" else 0
    for case in (
        seq_case(mode, 2, True, 5, 4, 9, lengths=True, proj_size=proj_size),
        seq_case(mode, 1, False, 3, 3, 5, with_hx=False, bias=False),
    ):
        check_backend(case, "triton", torch.float32)
    check_backend(cell_case(mode, 3, 7), "triton", torch.float32)
    check_backend(cell_case(mode, 2, 5, bias=False, with_hx=False), "triton", torch.float32)


class _KernelSpy:
    """Wraps a ``@triton.jit`` kernel: records the dtypes of the tensors of every launch."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return launch(*args, **kwargs)

        return run


@requires_triton_cpu
@pytest.mark.parametrize("mode", ("lstm", "gru", "rnn_tanh"))
def test_triton_interpreter_bfloat16(mode, monkeypatch):
    """bf16 sequences (lengths, bidirectional, LSTM projection) and cells within the bf16 bound,
    and only float32 buffers reach the Triton kernels: their math is fp32 and the Python side
    converts once per call. (A bf16 tensor in a kernel would run here — the interpreter computes
    in numpy — but GPU Triton rejects or mis-rounds some bf16 math; this keeps it out.)"""
    from turbolm.kernels import rnn as kr

    seen: set[torch.dtype] = set()
    for name in ("_fwd_step_kernel", "_bwd_step_kernel"):
        monkeypatch.setattr(kr, name, _KernelSpy(getattr(kr, name), seen))
    proj_size = 3 if mode == "lstm" else 0
    for case in (
        seq_case(mode, 2, True, 3, 4, 6, lengths=True, proj_size=proj_size),
        seq_case(mode, 1, False, 2, 3, 5, with_hx=False, bias=False),
        cell_case(mode, 3, 7),
    ):
        case.atol = BF16_ATOL
        check_backend(case, "triton", torch.bfloat16)
    assert seen == {torch.float32}


@requires_triton_cpu
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_triton_interpreter_sweep(mode):
    for layers, bidirectional, batch, steps, hidden in itertools.product(
        (1, 3), (False, True), (1, 5), (1, 7), (1, 33)
    ):
        case = seq_case(mode, layers, bidirectional, batch, steps, hidden)
        check_backend(case, "triton", torch.float32)
