"""Drop-in RNN modules (``turbolm.nn.rnn``): equivalence with torch.nn, PackedSequence, unbatched
input, cells, dropout, and the typed errors of the op layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import turbolm
from turbolm.errors import BackendError, DeviceError, DTypeError, InputError, ShapeError
from turbolm.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from turbolm.ops.rnn import gru, gru_cell, lstm, lstm_cell, rnn, rnn_cell

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

BACKENDS = ("reference", "torch")

# (turbolm class, torch class, constructor kwargs beyond input_size=4, hidden_size=6)
MODULES = {
    "lstm": (LSTM, torch.nn.LSTM, {}),
    "lstm_proj_nobias": (LSTM, torch.nn.LSTM, {"proj_size": 3, "bias": False}),
    "gru": (GRU, torch.nn.GRU, {}),
    "rnn_tanh": (RNN, torch.nn.RNN, {}),
    "rnn_relu_nobias": (RNN, torch.nn.RNN, {"nonlinearity": "relu", "bias": False}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads (and a busy CI machine makes them slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(kind, *, num_layers=2, bidirectional=True, batch_first=False, dropout=0.0):
    """A torch.nn module and its turbolm twin (fp64) holding the same weights."""
    ours_cls, torch_cls, kwargs = MODULES[kind]
    options = dict(
        num_layers=num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        dropout=dropout,
        dtype=torch.float64,
        **kwargs,
    )
    theirs = torch_cls(4, 6, **options)
    ours = ours_cls(4, 6, **options)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def flat(result):
    """(output, h) or (output, (h, c)) -> list of tensors (PackedSequence -> its data)."""
    out, hidden = result
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_same(ours, theirs):
    for a, b in zip(flat(ours), flat(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def make_hx(module, batch, unbatched=False):
    rows = module.num_layers * (2 if module.bidirectional else 1)
    lead = (rows,) if unbatched else (rows, batch)
    h = torch.randn(*lead, module.proj_size or module.hidden_size, dtype=torch.float64)
    if isinstance(module, torch.nn.LSTM):
        return h, torch.randn(*lead, module.hidden_size, dtype=torch.float64)
    return h


# --- drop-in equivalence --------------------------------------------------------------------


def test_constructor_parameters_and_state_dict_are_torch_nn():
    for kind, (ours_cls, torch_cls, kwargs) in MODULES.items():
        ours, theirs = (
            ours_cls(4, 6, 2, bidirectional=True, **kwargs),
            torch_cls(4, 6, 2, bidirectional=True, **kwargs),
        )
        assert isinstance(ours, torch_cls), kind
        assert list(ours.state_dict()) == list(theirs.state_dict()), kind
        assert [n for n, _ in ours.named_parameters()] == ours._flat_weights_names
        # and back: a turbolm state_dict loads into torch.nn
        theirs.load_state_dict(ours.state_dict())
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
        ours.flatten_parameters()  # a no-op on CPU, as for torch.nn
        assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("batch_first", (False, True))
def test_forward_and_gradients_match_torch_nn(backend, kind, batch_first):
    ours, theirs = make_pair(kind, batch_first=batch_first)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    hx = make_hx(theirs, 5 if batch_first else 3)
    with turbolm.use_backend(backend):
        got = ours(x, hx)
    want = theirs(x, hx)
    assert_same(got, want)
    upstream = [torch.randn_like(t) for t in flat(want)]
    sum((a * g).sum() for a, g in zip(flat(got), upstream)).backward()
    sum((a * g).sum() for a, g in zip(flat(want), upstream)).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_module_without_hx(backend):
    theirs = torch.nn.LSTM(4, 6, 2)
    ours = LSTM(4, 6, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 2, 4)
    with turbolm.use_backend(backend):
        got = ours(x)
    for a, b in zip(flat(got), flat(theirs(x))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODULES)
def test_unbatched_input(backend, kind):
    ours, theirs = make_pair(kind)
    x = torch.randn(5, 4, dtype=torch.float64)
    hx = make_hx(theirs, 1, unbatched=True)
    with turbolm.use_backend(backend):
        assert_same(ours(x, hx), theirs(x, hx))
        assert_same(ours(x), theirs(x))


# --- PackedSequence -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("enforce_sorted", (False, True))
@pytest.mark.parametrize("batch_first", (False, True))
def test_packed_sequence(backend, kind, enforce_sorted, batch_first):
    ours, theirs = make_pair(kind, batch_first=batch_first)
    lengths = [6, 6, 4, 1] if enforce_sorted else [4, 6, 1, 6]  # ties test the repacking order
    seqs = [torch.randn(n, 4, dtype=torch.float64, requires_grad=True) for n in lengths]
    padded = pad_sequence(seqs, batch_first=batch_first)
    packed = pack_padded_sequence(padded, lengths, batch_first, enforce_sorted=enforce_sorted)
    hx = make_hx(theirs, len(lengths))
    with turbolm.use_backend(backend):
        got_out, got_hidden = ours(packed, hx)
    want_out, want_hidden = theirs(packed, hx)
    assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
    for a, b in (
        (got_out.sorted_indices, want_out.sorted_indices),
        (got_out.unsorted_indices, want_out.unsorted_indices),
    ):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_same((got_out, got_hidden), (want_out, want_hidden))
    # Both graphs share the packing nodes, so keep them for the second backward.
    grad_ours = torch.autograd.grad(got_out.data.sum(), seqs, retain_graph=True)
    grad_theirs = torch.autograd.grad(want_out.data.sum(), seqs)
    for a, b in zip(grad_ours, grad_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", MODULES)
def test_cuda_module_matches_torch_nn(kind):
    """On GPU the torch backend gets the module's flattened cuDNN weights, as torch.nn does."""
    ours, theirs = make_pair(kind)
    ours, theirs = ours.float().cuda(), theirs.float().cuda()
    x = torch.randn(7, 3, 4, device="cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*single contiguous chunk.*")
        with turbolm.use_backend("torch"):
            got = ours(x)
    for a, b in zip(flat(got), flat(theirs(x))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the same _VF call
    lengths = [7, 3, 5]
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    # cuDNN RNNs use TF32 for fp32 by default (errors ~5e-5 here); compare at full fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = flat(theirs(packed))
        for backend in BACKENDS:
            with turbolm.use_backend(backend):
                got = ours(packed)
            for a, b in zip(flat(got), expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- cells ----------------------------------------------------------------------------------

CELLS = {
    "lstm": (LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (GRUCell, torch.nn.GRUCell, {}),
    "rnn_tanh": (RNNCell, torch.nn.RNNCell, {}),
    "rnn_relu": (RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", (False, True))
def test_cells_match_torch_nn(backend, kind, bias):
    ours_cls, torch_cls, kwargs = CELLS[kind]
    theirs = torch_cls(4, 6, bias=bias, dtype=torch.float64, **kwargs)
    ours = ours_cls(4, 6, bias=bias, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    is_lstm = kind == "lstm"
    for lead in ((3,), ()):  # batched, unbatched
        x = torch.randn(*lead, 4, dtype=torch.float64)
        h = torch.randn(*lead, 6, dtype=torch.float64)
        hx = (h, torch.randn_like(h)) if is_lstm else h
        with turbolm.use_backend(backend):
            got = [ours(x, hx), ours(x)]
        want = [theirs(x, hx), theirs(x)]
        for g, w in zip(got, want):
            for a, b in zip(g if is_lstm else (g,), w if is_lstm else (w,)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", (*BACKENDS, "cpu"))
@pytest.mark.parametrize("kind", CELLS)
def test_cells_with_an_empty_batch(backend, kind):
    """B = 0: the shapes torch.nn gives (the cpu LSTM cell returned c' as (1, 0, H))."""
    ours_cls, torch_cls, kwargs = CELLS[kind]
    ours, theirs = ours_cls(4, 5, **kwargs), torch_cls(4, 5, **kwargs)
    x = torch.randn(0, 4, requires_grad=True)
    with turbolm.use_backend(backend):
        got = ours(x)
    want = theirs(x)
    got, want = (got, want) if kind == "lstm" else ((got,), (want,))
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    with turbolm.use_backend(backend):
        sum(t.sum() for t in got).backward()
    assert x.grad.shape == (0, 4)


# --- dropout between layers -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("lstm", "gru", "rnn_tanh"))
def test_dropout_train_and_eval(backend, kind):
    ours, _ = make_pair(kind, num_layers=3, dropout=0.5)
    no_dropout, _ = make_pair(kind, num_layers=3, dropout=0.0)
    no_dropout.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with turbolm.use_backend(backend):
        ours.train()
        torch.manual_seed(0)
        first = flat(ours(x))
        torch.manual_seed(0)
        again = flat(ours(x))
        torch.manual_seed(1)
        other = flat(ours(x))
        ours.eval()
        evaluated = flat(ours(x))
        reference = flat(no_dropout.eval()(x))
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # same seed, same masks
    assert not torch.equal(first[0], other[0])  # another seed, other masks
    assert not torch.allclose(first[0], evaluated[0])  # train mode does drop
    for a, b in zip(evaluated, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval mode: no dropout at all


def test_dropout_single_layer_is_a_no_op():
    # torch.nn warns at construction; the op applies dropout only between layers.
    with pytest.warns(UserWarning):
        ours = LSTM(4, 6, 1, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    for backend in BACKENDS:
        with turbolm.use_backend(backend):
            a, b = flat(ours.train()(x)), flat(ours.eval()(x))
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)


# --- typed errors ---------------------------------------------------------------------------


def _lstm_weights(num_layers=1, proj_size=0, bidirectional=False):
    return list(
        torch.nn.LSTM(
            4, 6, num_layers, proj_size=proj_size, bidirectional=bidirectional
        )._flat_weights
    )


def test_int_input_is_a_dtype_error():
    with pytest.raises(DTypeError, match="input"):
        lstm(torch.ones(5, 2, 4, dtype=torch.long), None, _lstm_weights(), num_layers=1)
    with pytest.raises(DTypeError, match="input"):
        LSTMCell(4, 6)(torch.ones(2, 4, dtype=torch.long))


def test_mixed_dtypes_are_dtype_errors():
    x = torch.randn(5, 2, 4)
    with pytest.raises(DTypeError, match="weight_ih_l0"):
        lstm(x.double(), None, _lstm_weights(), num_layers=1)
    hx = (torch.zeros(1, 2, 6, dtype=torch.float64), torch.zeros(1, 2, 6))
    with pytest.raises(DTypeError, match="h0"):
        lstm(x, hx, _lstm_weights(), num_layers=1)
    with pytest.raises(DTypeError, match="lengths"):
        lstm(x, None, _lstm_weights(), num_layers=1, lengths=torch.tensor([5.0, 3.0]))


def test_wrong_input_size_is_a_shape_error():
    with pytest.raises(ShapeError, match="input_size=4"):
        lstm(torch.randn(5, 2, 3), None, _lstm_weights(), num_layers=1)
    with pytest.raises(ShapeError, match="input_size=4"):
        GRU(4, 6)(torch.randn(5, 2, 3))
    with pytest.raises(ShapeError, match="dimensions"):
        RNN(4, 6)(torch.randn(1, 5, 2, 4))
    with pytest.raises(ShapeError, match="input_size=4"):
        GRUCell(4, 6)(torch.randn(2, 5))


def test_wrong_hx_shape_is_a_shape_error_naming_the_expected_shape():
    x = torch.randn(5, 2, 4)
    with pytest.raises(ShapeError, match=r"h0\) must have shape \(2, 2, 3\)"):
        LSTM(4, 6, 2, proj_size=3)(x, (torch.zeros(2, 2, 6), torch.zeros(2, 2, 6)))
    with pytest.raises(ShapeError, match=r"c0\) must have shape \(1, 2, 6\)"):
        LSTM(4, 6)(x, (torch.zeros(1, 2, 6), torch.zeros(1, 3, 6)))
    with pytest.raises(ShapeError, match=r"hx must have shape \(4, 2, 6\)"):
        GRU(4, 6, 2, bidirectional=True)(x, torch.zeros(2, 2, 6))
    with pytest.raises(ShapeError, match=r"hx must have shape \(1, 6\)"):
        RNN(4, 6)(torch.randn(5, 4), torch.zeros(1, 1, 6))  # unbatched input wants 2-D hx
    with pytest.raises(ShapeError, match=r"hx must have shape \(2, 6\)"):
        RNNCell(4, 6)(torch.randn(2, 4), torch.zeros(3, 6))


def test_mixed_devices_are_device_errors():
    x = torch.randn(5, 2, 4)
    meta = [w.to("meta") for w in _lstm_weights()]
    with pytest.raises(DeviceError, match="weight_ih_l0 is on meta"):
        lstm(x, None, meta, num_layers=1)
    hx = (torch.zeros(1, 2, 6, device="meta"), torch.zeros(1, 2, 6))
    with pytest.raises(DeviceError, match="h0"):
        lstm(x, hx, _lstm_weights(), num_layers=1)
    cell = torch.nn.GRUCell(4, 6)
    with pytest.raises(DeviceError, match="weight_hh"):
        gru_cell(torch.randn(2, 4), None, cell.weight_ih, cell.weight_hh.to("meta"))


def test_bad_options_are_input_errors():
    x = torch.randn(5, 2, 4)
    weights = _lstm_weights()
    with pytest.raises(InputError, match="dropout"):
        lstm(x, None, weights, num_layers=1, dropout=1.0, training=True)
    with pytest.raises(InputError, match="dropout"):
        LSTM(4, 6, 2, dropout=1.0)(x)  # torch.nn accepts dropout=1 at construction
    with pytest.raises(InputError, match="dropout"):
        gru(x, None, [torch.randn(18, 4)], num_layers=1, dropout=-0.1)
    with pytest.raises(InputError, match="num_layers"):
        lstm(x, None, weights, num_layers=0)
    with pytest.raises(InputError, match="weights must hold 8 tensors"):
        lstm(x, None, weights, num_layers=2)
    with pytest.raises(InputError, match="nonlinearity"):
        rnn(x, None, list(torch.nn.RNN(4, 6)._flat_weights), num_layers=1, nonlinearity="gelu")
    with pytest.raises(InputError, match="nonlinearity"):
        rnn_cell(x[0], None, torch.randn(6, 4), torch.randn(6, 6), nonlinearity="sigmoid")


def test_bad_projection_and_hx_types_are_input_errors():
    x = torch.randn(5, 2, 4)
    with pytest.raises(InputError, match="proj_size"):
        lstm(x, None, _lstm_weights(), num_layers=1, proj_size=-1)
    weights = _lstm_weights(proj_size=3)
    weights[-1] = torch.randn(6, 6)  # weight_hr as if proj_size == hidden_size
    with pytest.raises(InputError, match="smaller than hidden_size"):
        lstm(x, None, weights, num_layers=1, proj_size=6)
    with pytest.raises(InputError, match=r"tuple \(h0, c0\)"):
        lstm(x, torch.zeros(1, 2, 6), _lstm_weights(), num_layers=1)
    with pytest.raises(ShapeError, match=r"weight_hh_l0 must have shape \(24, 6\)"):
        lstm(
            x, None, _lstm_weights()[:1] + [torch.randn(24, 5)] + _lstm_weights()[2:], num_layers=1
        )


def test_bad_lengths_are_typed_errors():
    x = torch.randn(5, 2, 4)
    weights = _lstm_weights()
    with pytest.raises(InputError, match=r"lengths must be in \[1, 5\]"):
        lstm(x, None, weights, num_layers=1, lengths=torch.tensor([6, 2]))
    with pytest.raises(InputError, match=r"lengths must be in \[1, 5\]"):
        lstm(x, None, weights, num_layers=1, lengths=torch.tensor([0, 2]))
    with pytest.raises(ShapeError, match=r"lengths must have shape \(2,\)"):
        lstm(x, None, weights, num_layers=1, lengths=torch.tensor([5, 2, 1]))
    with pytest.raises(InputError, match="batched"):
        lstm(x[:, 0], None, weights, num_layers=1, lengths=torch.tensor([5]))
    with pytest.raises(DTypeError, match="lengths"):
        lstm(x, None, weights, num_layers=1, lengths=torch.tensor([True, False]))


def test_unknown_backend_is_a_backend_error():
    with pytest.raises(BackendError, match="cuda"):
        lstm(torch.randn(5, 2, 4), None, _lstm_weights(), num_layers=1, backend="cuda")
    with pytest.raises(BackendError):
        lstm_cell(torch.randn(2, 4), None, torch.randn(24, 4), torch.randn(24, 6), backend="nope")


AUTOCAST_MODULES = {
    **MODULES,
    "lstm_cell": (LSTMCell, torch.nn.LSTMCell, {}),
    "gru_cell_nobias": (GRUCell, torch.nn.GRUCell, {"bias": False}),
    "rnn_cell": (RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(AUTOCAST_MODULES))
def test_autocast_input_from_an_autocast_op(backend, kind):
    """Under autocast a recurrent module reads what an autocast op made (a bf16 Linear output)
    with fp32 weights: torch.nn runs it in bf16; turbolm raised DTypeError ("weight_ih_l0 has
    dtype float32 but input has bfloat16"). Now the op runs in the autocast dtype: bf16 output,
    values and fp32 weight / input gradients like torch.nn's within bf16 rounding."""
    cls, torch_cls, kwargs = AUTOCAST_MODULES[kind]
    torch.manual_seed(0)
    ours, theirs = cls(4, 6, **kwargs), torch_cls(4, 6, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    proj = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4) if "cell" in kind else torch.randn(5, 2, 4)
    results = []
    for module in (ours, theirs):
        xx = x.clone().requires_grad_()
        with turbolm.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(proj(xx))
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.float().square().sum().backward()
        weight = module.weight_ih if "cell" in kind else module.weight_ih_l0
        results.append((out, xx.grad, weight.grad))
    (out, gx, gw), (ref, rgx, rgw) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    assert gx.dtype == gw.dtype == torch.float32
    for got, want in ((out, ref), (gx, rgx), (gw, rgw)):
        scale = want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= 0.03 * scale + 1e-3
