"""RNN op family (``turbolm.ops.rnn``): every backend against the fp64 reference.

Outputs, final states and every gradient (input, initial states, each weight) go through the
shared harness. Sizes stay tiny so the whole sweep runs in seconds on a CPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.harness import OpCase, check_backend
from turbolm.ops import registry
from turbolm.ops.rnn import (
    GATES,
    gru,
    gru_cell,
    lstm,
    lstm_cell,
    rnn,
    rnn_cell,
    rnn_layer_reference,
)

MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
TORCH_CLS = {
    "lstm": torch.nn.LSTM,
    "gru": torch.nn.GRU,
    "rnn_tanh": torch.nn.RNN,
    "rnn_relu": torch.nn.RNN,
}
INPUT_SIZE = 3

# torch's own warning when an LSTM with projections runs on CPU (torch.nn.LSTM warns the same).
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

# torch's CPU bf16 RNNs round gates and states to bf16 at every step while the harness baseline
# (our reference, fp32 inside) does not, so "2x baseline" underestimates a plain bf16 RNN's error;
# measured need over 40 seeds: <= 1.2e-2 * max|ref|.
BF16_ATOL = {torch.bfloat16: 3e-2}
RELU_BF16_SKIP = (
    "relu's kink: bf16 rounding flips the sign of near-zero pre-activations, so gradients "
    "differ by O(1) at those units whatever the backend; fp32 covers rnn_relu"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CI machine OpenMP's
    barriers make each op milliseconds slower; restore the caller's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weight_layout(mode, hidden, layers, bidirectional, bias=True, proj_size=0, input_size=3):
    """(names, shapes) of the flat weights in torch.nn order, read off a tiny torch module."""
    kwargs = {"proj_size": proj_size} if mode == "lstm" else {}
    if mode.startswith("rnn"):
        kwargs["nonlinearity"] = mode[4:]
    module = TORCH_CLS[mode](
        input_size, hidden, layers, bias=bias, bidirectional=bidirectional, device="meta", **kwargs
    )
    return list(module._flat_weights_names), [tuple(w.shape) for w in module._flat_weights]


def run_op(mode, backend, x, hx, weights, **kwargs):
    """Call the op for ``mode``; returns a flat tuple (output, h_n[, c_n])."""
    if mode == "lstm":
        out, (h, c) = lstm(x, hx, weights, backend=backend, **kwargs)
        return out, h, c
    if mode == "gru":
        return gru(x, hx, weights, backend=backend, **kwargs)
    return rnn(x, hx, weights, nonlinearity=mode[4:], backend=backend, **kwargs)


def random_lengths(gen, batch, steps):
    """(B,) int64 in [1, steps], always holding both extremes when batch allows."""
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    if batch > 1:
        lengths[-1] = 1
    return lengths


def seq_case(
    mode,
    layers,
    bidirectional,
    batch,
    steps,
    hidden,
    *,
    with_hx=True,
    proj_size=0,
    lengths=False,
    bias=True,
    batch_first=False,
    unbatched=False,
):
    """An OpCase over ``lstm``/``gru``/``rnn`` with inputs named after torch.nn's parameters."""
    names, shapes = weight_layout(mode, hidden, layers, bidirectional, bias, proj_size)
    dirs = 2 if bidirectional else 1
    out_size = proj_size or hidden
    state_lead = (layers * dirs,) if unbatched else (layers * dirs, batch)

    def make_inputs(gen):
        x_shape = (steps, INPUT_SIZE) if unbatched else (steps, batch, INPUT_SIZE)
        if batch_first and not unbatched:
            x_shape = (batch, steps, INPUT_SIZE)
        inputs = {"x": torch.randn(x_shape, generator=gen, dtype=torch.float64)}
        bound = 1 / math.sqrt(hidden)  # torch.nn's init range
        for name, shape in zip(names, shapes):
            inputs[name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        if with_hx:
            inputs["h0"] = torch.randn(state_lead + (out_size,), generator=gen, dtype=torch.float64)
            if mode == "lstm":
                inputs["c0"] = torch.randn(
                    state_lead + (hidden,), generator=gen, dtype=torch.float64
                )
        if lengths:
            inputs["lengths"] = random_lengths(gen, batch, steps)
        return inputs

    def call(backend, x, h0=None, c0=None, lengths=None, **weights):
        hx = (h0, c0) if mode == "lstm" and h0 is not None else h0
        kwargs = {"proj_size": proj_size} if mode == "lstm" else {}
        return run_op(
            mode,
            backend,
            x,
            hx,
            [weights[n] for n in names],
            num_layers=layers,
            bias=bias,
            bidirectional=bidirectional,
            batch_first=batch_first,
            lengths=lengths,
            **kwargs,
        )

    states = (("h0", "c0") if mode == "lstm" else ("h0",)) if with_hx else ()
    differentiable = ("x", *states, *names)
    label = (
        f"{mode}-L{layers}-{'bi' if bidirectional else 'uni'}-B{batch}-T{steps}-H{hidden}"
        f"{'-hx' if with_hx else ''}{f'-proj{proj_size}' if proj_size else ''}"
        f"{'-len' if lengths else ''}{'' if bias else '-nobias'}{'-bf' if batch_first else ''}"
    )
    return OpCase(label, call, make_inputs, grad=differentiable, cast=differentiable)


# --- the sweep: mode x layers x direction x batch x seq x hidden x initial state ---------------

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
def test_torch_backend_sweep(mode, layers, bidirectional, batch, steps, hidden, with_hx):
    case = seq_case(mode, layers, bidirectional, batch, steps, hidden, with_hx=with_hx)
    check_backend(case, "torch", torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layers", (1, 3))
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("hidden", (1, 33))
def test_torch_backend_variable_lengths(mode, layers, bidirectional, hidden):
    case = seq_case(mode, layers, bidirectional, 5, 7, hidden, lengths=True, with_hx=layers == 3)
    check_backend(case, "torch", torch.float32)


@pytest.mark.parametrize("layers", (1, 3))
@pytest.mark.parametrize("bidirectional", (False, True))
@pytest.mark.parametrize("lengths", (False, True))
@pytest.mark.parametrize("hidden,proj_size", ((33, 5), (2, 1)))
def test_torch_backend_lstm_projection(layers, bidirectional, lengths, hidden, proj_size):
    case = seq_case(
        "lstm", layers, bidirectional, 5, 7, hidden, proj_size=proj_size, lengths=lengths
    )
    check_backend(case, "torch", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_layouts(mode):
    """No bias, batch_first (non-contiguous time-major view) and unbatched input."""
    for case in (
        seq_case(mode, 2, True, 4, 5, 6, bias=False),
        seq_case(mode, 2, True, 4, 5, 6, batch_first=True, lengths=True),
        seq_case(mode, 2, True, 1, 5, 6, unbatched=True),
        seq_case(mode, 2, False, 1, 5, 6, unbatched=True, with_hx=False),
    ):
        check_backend(case, "torch", torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", (False, True))
def test_torch_backend_bfloat16(mode, lengths):
    if mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    case = seq_case(mode, 2, True, 3, 5, 8, lengths=lengths)
    case.atol = BF16_ATOL
    check_backend(case, "torch", torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_large(mode):
    case = seq_case(mode, 2, True, 16, 64, 129, lengths=True, proj_size=31 if mode == "lstm" else 0)
    check_backend(case, "torch", torch.float32)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_torch_backend_cuda(mode, dtype, monkeypatch):
    """cuDNN (or torch's CUDA fallback) against the fp64 reference, padded and packed."""
    if dtype == torch.bfloat16 and mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    # cuDNN RNNs may use TF32 for fp32 by default, which the fp32 bound rightly rejects.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for lengths in (False, True):
        proj_size = 5 if mode == "lstm" else 0
        case = seq_case(mode, 2, True, 5, 7, 33, lengths=lengths, proj_size=proj_size)
        case.atol = BF16_ATOL
        check_backend(case, "torch", dtype, device="cuda")
        check_backend(case, "reference", dtype, device="cuda")


# --- cells ----------------------------------------------------------------------------------

CELL_OPS = {
    "lstm": lambda x, hx, *w, backend: lstm_cell(x, hx, *w, backend=backend),
    "gru": lambda x, hx, *w, backend: gru_cell(x, hx, *w, backend=backend),
    "rnn_tanh": lambda x, hx, *w, backend: rnn_cell(
        x, hx, *w, nonlinearity="tanh", backend=backend
    ),
    "rnn_relu": lambda x, hx, *w, backend: rnn_cell(
        x, hx, *w, nonlinearity="relu", backend=backend
    ),
}


def cell_case(mode, batch, hidden, *, with_hx=True, bias=True, unbatched=False):
    gates = GATES[mode] * hidden
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
    shapes = [(gates, INPUT_SIZE), (gates, hidden), (gates,), (gates,)]
    lead = () if unbatched else (batch,)

    def make_inputs(gen):
        inputs = {"x": torch.randn(lead + (INPUT_SIZE,), generator=gen, dtype=torch.float64)}
        for name, shape in zip(names, shapes):
            inputs[name] = (
                torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
            ) / math.sqrt(hidden)
        if with_hx:
            inputs["h"] = torch.randn(lead + (hidden,), generator=gen, dtype=torch.float64)
            if mode == "lstm":
                inputs["c"] = torch.randn(lead + (hidden,), generator=gen, dtype=torch.float64)
        return inputs

    def call(backend, x, h=None, c=None, **weights):
        hx = (h, c) if mode == "lstm" and h is not None else h
        return CELL_OPS[mode](x, hx, *[weights[n] for n in names], backend=backend)

    states = (("h", "c") if mode == "lstm" else ("h",)) if with_hx else ()
    return OpCase(f"{mode}_cell-B{batch}-H{hidden}", call, make_inputs, grad=("x", *states, *names))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,hidden", ((1, 1), (5, 33)))
@pytest.mark.parametrize("with_hx", (False, True))
@pytest.mark.parametrize("bias", (False, True))
def test_cell_torch_backend(mode, batch, hidden, with_hx, bias):
    check_backend(
        cell_case(mode, batch, hidden, with_hx=with_hx, bias=bias), "torch", torch.float32
    )


@pytest.mark.parametrize("mode", MODES)
def test_cell_unbatched_and_bfloat16(mode):
    check_backend(cell_case(mode, 1, 7, unbatched=True), "torch", torch.float32)
    if mode == "rnn_relu":
        pytest.skip(RELU_BF16_SKIP)
    case = cell_case(mode, 4, 7)
    case.atol = BF16_ATOL
    check_backend(case, "torch", torch.bfloat16)


# --- gradcheck of the reference in float64 -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", (False, True))
def test_reference_gradcheck(mode, lengths):
    proj_size = 1 if mode == "lstm" else 0
    case = seq_case(mode, 2, True, 2, 3, 2, proj_size=proj_size, lengths=lengths)
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    names = list(case.grad)
    fixed = {k: v for k, v in inputs.items() if k not in names}
    if mode == "rnn_relu":
        # Keep pre-activations away from relu's kink, where finite differences are not a gradient.
        inputs = {
            k: v.abs() + 0.1 if k.startswith(("weight", "bias", "x", "h0")) else v
            for k, v in inputs.items()
        }
    tensors = tuple(inputs[n].requires_grad_(True) for n in names)

    def fn(*args):
        return case.call("reference", **dict(zip(names, args)), **fixed)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cell_reference_gradcheck(mode):
    case = cell_case(mode, 3, 4)
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    names = list(case.grad)
    tensors = tuple(inputs[n].requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(
        lambda *a: case.call("reference", **dict(zip(names, a))), tensors, eps=1e-6, atol=1e-5
    )


# --- semantics of variable lengths ------------------------------------------------------------


@pytest.mark.parametrize("backend", ("reference", "torch"))
@pytest.mark.parametrize("mode", MODES)
def test_lengths_match_truncated_sequences(backend, mode):
    """Each sequence run alone, truncated to its length, gives the same outputs and states."""
    case = seq_case(mode, 2, True, 4, 6, 5, lengths=True)
    inputs = case.make_inputs(torch.Generator().manual_seed(1))
    out, *states = case.call(backend, **inputs)
    for b, n in enumerate(inputs["lengths"].tolist()):
        alone = dict(inputs, x=inputs["x"][:n, b : b + 1], lengths=None)
        alone["h0"] = inputs["h0"][:, b : b + 1]
        if mode == "lstm":
            alone["c0"] = inputs["c0"][:, b : b + 1]
        ref_out, *ref_states = case.call(backend, **alone)
        torch.testing.assert_close(out[:n, b : b + 1], ref_out)
        assert (out[n:, b] == 0).all()
        for s, r in zip(states, ref_states):
            torch.testing.assert_close(s[:, b : b + 1], r)


# --- the kernel-backend contract, exercised with a stand-in kernel ----------------------------


def _fake_kernel_fwd(x, h0, c0, lengths, *weights, **params):
    """A 'kernel' obeying the per-layer contract, built on the per-layer oracle."""
    with torch.no_grad():
        out = rnn_layer_reference(x, h0, c0, lengths, *weights, **params)
    return (out, x, h0, c0, lengths, *weights)


def _fake_kernel_bwd(grad_out, x, h0, c0, lengths, *weights, **params):
    leaves = [
        t.detach().requires_grad_(True) if t is not None else None for t in (x, h0, c0, *weights)
    ]
    with torch.enable_grad():
        out = rnn_layer_reference(leaves[0], leaves[1], leaves[2], lengths, *leaves[3:], **params)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    dx, dh0, dc0, *dweights = [next(grads) if t is not None else None for t in leaves]
    return (dx, dh0, dc0, None, *dweights)


def _fake_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, *, mode):
    from turbolm.ops.rnn import cell_reference

    states = (h, c) if c is not None else (h,)
    with torch.no_grad():
        out = cell_reference(x, states, w_ih, w_hh, b_ih, b_hh, mode=mode)
    return (out, x, h, c, w_ih, w_hh, b_ih, b_hh)


def _fake_cell_bwd(grad_out, *saved, mode):
    from turbolm.ops.rnn import cell_reference

    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in saved]
    x, h, c, w_ih, w_hh, b_ih, b_hh = leaves
    with torch.enable_grad():
        out = cell_reference(
            x, (h, c) if c is not None else (h,), w_ih, w_hh, b_ih, b_hh, mode=mode
        )
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in leaves)


@pytest.fixture
def fake_kernels(monkeypatch):
    """Register the stand-in kernels as the ``cpu`` backend, only for this test."""
    for op in ("lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell"):
        monkeypatch.setitem(registry._REGISTRY, op, dict(registry._REGISTRY[op]))
        if op.endswith("_cell"):
            registry.register(op, "cpu", fwd=_fake_cell_fwd, bwd=_fake_cell_bwd)
        else:
            registry.register(op, "cpu", fwd=_fake_kernel_fwd, bwd=_fake_kernel_bwd)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_contract_plumbing(fake_kernels, mode):
    proj_size = 3 if mode == "lstm" else 0
    for case in (
        seq_case(mode, 3, True, 5, 6, 7, lengths=True, proj_size=proj_size),
        seq_case(mode, 2, False, 2, 4, 5, with_hx=False, batch_first=True),
        seq_case(mode, 2, True, 1, 4, 5, unbatched=True),
    ):
        check_backend(case, "cpu", torch.float32)
    check_backend(cell_case(mode, 3, 5), "cpu", torch.float32)
    check_backend(cell_case(mode, 3, 5, bias=False, with_hx=False), "cpu", torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_kernel_path_dropout_matches_reference(fake_kernels, mode):
    """The op layer's inter-layer dropout draws the same masks as the reference backend."""
    case = seq_case(mode, 3, True, 4, 5, 6)
    inputs = case.make_inputs(torch.Generator().manual_seed(2))
    names = [n for n in inputs if n.startswith(("weight", "bias"))]
    outs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(7)
        hx = (inputs["h0"], inputs["c0"]) if mode == "lstm" else inputs["h0"]
        outs.append(
            run_op(
                mode,
                backend,
                inputs["x"],
                hx,
                [inputs[n] for n in names],
                num_layers=3,
                bidirectional=True,
                dropout=0.5,
                training=True,
            )
        )
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_auto_picks_torch_on_cpu():
    assert registry.select("lstm", "cpu").name == "torch"
    assert registry.select("gru_cell", "cpu").name == "torch"


LENGTHS_COMPILE_SCRIPT = """
import torch
from turbolm.ops.rnn import lstm

module = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
lengths = torch.tensor([3, 1])

def run(x, *weights):
    kwargs = {"num_layers": 2, "bidirectional": True, "lengths": lengths}
    return lstm(x, None, list(weights), **kwargs, backend="reference")

x = torch.randn(3, 2, 3)
out, (h_n, c_n) = torch.compile(run, fullgraph=True, backend="aot_eager")(
    x, *module._flat_weights
)
expected, (eh, ec) = run(x, *module._flat_weights)
for got, want in ((out, expected), (h_n, eh), (c_n, ec)):
    torch.testing.assert_close(got, want)
print("lengths compile ok")
"""


def test_torch_compile_with_lengths():
    """torch.compile(fullgraph=True) of the op with variable lengths: the lengths range check
    called .item() on the lengths (a data-dependent guard dynamo cannot trace). In a fresh
    process (a torch.compile trace breaks later Triton interpreter kernels in the process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", LENGTHS_COMPILE_SCRIPT],
        env={k: v for k, v in os.environ.items() if k != "TURBOLM_BACKEND"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and "lengths compile ok" in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )
