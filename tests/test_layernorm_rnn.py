"""LayerNorm-LSTM / LayerNorm-GRU (``layer_norm=True`` on ``turbolm.nn.LSTM`` / ``GRU``).

The oracle is :func:`plain_reference` below: the paper's formulas written out with
``torch.nn.functional.layer_norm``, one sequence at a time over its own length (so variable
lengths are checked without the masking the implementation uses), biases added after the
LayerNorms. The ``cpu`` LayerNorm backend tests build the C++ extension on first use (skipped
when it cannot be built; ``tests/test_norm_kernels.py::test_extension_builds`` then fails).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.harness import OpCase, check_backend
from turbolm import ext
from turbolm.errors import BackendError, ConfigError, DTypeError, InputError
from turbolm.nn.rnn import GRU, LSTM, RNN
from turbolm.ops.layernorm_rnn import layernorm_gru, layernorm_lstm, ln_weight_names

CLASSES = {"lstm": (LSTM, torch.nn.LSTM), "gru": (GRU, torch.nn.GRU)}
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the plain reference -----------------------------------------------------------------------


def plain_cell(mode, x, h, c, p, eps):
    """One step of one sequence: x (I,), h (H,), c (H,) or None; ``p`` this direction's params."""
    a_x = F.layer_norm(x @ p["w_ih"].T, p["g_ih"].shape, p["g_ih"], p["s_ih"], eps)
    a_h = F.layer_norm(h @ p["w_hh"].T, p["g_hh"].shape, p["g_hh"], p["s_hh"], eps)
    if p.get("b_ih") is not None:
        a_x = a_x + p["b_ih"]
        a_h = a_h + p["b_hh"]
    if mode == "lstm":
        i, f, g, o = (a_x + a_h).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, p["g_c"].shape, p["g_c"], p["s_c"], eps))
        return h, c
    x_r, x_z, x_n = a_x.chunk(3)
    h_r, h_z, h_n = a_h.chunk(3)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None


def direction_params(mode, named, layer, reverse):
    """The parameters of one layer/direction from a ``{name: tensor}`` dict (module names)."""
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    p = {
        "w_ih": named[f"weight_ih{sfx}"],
        "w_hh": named[f"weight_hh{sfx}"],
        "b_ih": named.get(f"bias_ih{sfx}"),
        "b_hh": named.get(f"bias_hh{sfx}"),
        "g_ih": named[f"ln_ih_weight{sfx}"],
        "s_ih": named[f"ln_ih_bias{sfx}"],
        "g_hh": named[f"ln_hh_weight{sfx}"],
        "s_hh": named[f"ln_hh_bias{sfx}"],
    }
    if mode == "lstm":
        p["g_c"], p["s_c"] = named[f"ln_c_weight{sfx}"], named[f"ln_c_bias{sfx}"]
    return p


def plain_reference(
    mode, x, h0, c0, named, *, num_layers, bidirectional, lengths=None, eps=EPS, dropout_masks=None
):
    """x (T, B, I); h0/c0 (L*D, B, H) -> (y (T, B, D*H), h_n, c_n or None), in x's dtype.

    Each sequence b runs alone over its first ``lengths[b]`` steps (forward: 0..len-1, reverse:
    len-1..0); its outputs after that are zero. ``dropout_masks[k]`` (T, B, D*H) multiplies
    layer k's output (for the dropout test).
    """
    steps, batch = x.shape[:2]
    dirs = 2 if bidirectional else 1
    lens = [steps] * batch if lengths is None else [int(v) for v in lengths]
    h_n, c_n = [], []
    for k in range(num_layers):
        y = x.new_zeros(steps, batch, dirs * h0.shape[-1])
        for d in range(dirs):
            p = direction_params(mode, named, k, d == 1)
            row = k * dirs + d
            width = h0.shape[-1]
            hs, cs = [], []
            for b in range(batch):
                h = h0[row, b]
                c = c0[row, b] if mode == "lstm" else None
                order = range(lens[b] - 1, -1, -1) if d == 1 else range(lens[b])
                outs = {}
                for t in order:
                    h, c = plain_cell(mode, x[t, b], h, c, p, eps)
                    outs[t] = h
                hs.append(h)
                cs.append(c)
                column = torch.stack(
                    [outs.get(t, x.new_zeros(width)) for t in range(steps)]
                )  # (T, H)
                y[:, b, d * width : (d + 1) * width] = column
            h_n.append(torch.stack(hs))
            if mode == "lstm":
                c_n.append(torch.stack(cs))
        if dropout_masks is not None and k < num_layers - 1:
            y = y * dropout_masks[k]
        x = y
    return x, torch.stack(h_n), (torch.stack(c_n) if mode == "lstm" else None)


# ---- helpers -------------------------------------------------------------------------------------


def make_module(
    mode,
    *,
    num_layers=2,
    bidirectional=True,
    batch_first=False,
    bias=True,
    input_size=3,
    hidden=4,
    dtype=torch.float64,
    seed=0,
    dropout=0.0,
):
    """A layer_norm module with random (not 1/0) LayerNorm gains/shifts, so they matter."""
    torch.manual_seed(seed)
    cls = CLASSES[mode][0]
    m = cls(
        input_size,
        hidden,
        num_layers=num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        dropout=dropout,
        layer_norm=True,
        dtype=dtype,
    )
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "_weight_" in name else 0.0))
    return m


def states(mode, m, batch, dtype=torch.float64):
    rows = m.num_layers * (2 if m.bidirectional else 1)
    h0 = torch.randn(rows, batch, m.hidden_size, dtype=dtype)
    c0 = torch.randn(rows, batch, m.hidden_size, dtype=dtype) if mode == "lstm" else None
    return h0, c0


def run_module(mode, m, x, h0, c0, **kw):
    hx = (h0, c0) if mode == "lstm" else h0
    y, hn = m(x, hx, **kw) if kw else m(x, hx)
    return (y, *hn) if mode == "lstm" else (y, hn)


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- module vs the plain fp64 reference ----------------------------------------------------


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first,bias",
    [(1, False, False, True), (2, True, True, True), (3, True, False, False)],
)
def test_module_matches_reference_fp64(mode, layers, bidirectional, batch_first, bias):
    """Outputs, final states and every gradient (input, states, all parameters) in fp64."""
    m = make_module(
        mode, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias
    )
    steps, batch = 5, 3
    x = torch.randn(steps, batch, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = states(mode, m, batch)
    h0.requires_grad_(True)
    if c0 is not None:
        c0.requires_grad_(True)
    x_in = x.transpose(0, 1) if batch_first else x
    ours = run_module(mode, m, x_in, h0, c0)
    ours = (ours[0].transpose(0, 1) if batch_first else ours[0], *ours[1:])
    named = dict(m.named_parameters())
    ref = plain_reference(mode, x, h0, c0, named, num_layers=layers, bidirectional=bidirectional)
    ref = [r for r in ref if r is not None]
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b)
    grads_out = [torch.randn_like(r) for r in ref]
    inputs = [x, h0] + ([c0] if c0 is not None else []) + list(named.values())
    names = ["x", "h0"] + (["c0"] if c0 is not None else []) + list(named)
    got = torch.autograd.grad(ours, inputs, grads_out)
    want = torch.autograd.grad(ref, inputs, grads_out)
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s, n=name: f"{n}: {s}")
    # The LayerNorms are really there: the same torch.nn weights without them differ.
    plain = CLASSES[mode][1](
        3,
        4,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        dtype=torch.float64,
    )
    plain.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        out_plain = plain(x_in, (h0, c0) if mode == "lstm" else h0)[0]
    ours_y = ours[0].transpose(0, 1) if batch_first else ours[0]
    assert (out_plain - ours_y).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_fp64(mode):
    """torch.autograd.gradcheck through the functional op (2 layers, bidirectional, lengths)."""
    m = make_module(mode, num_layers=2, bidirectional=True, input_size=2, hidden=2)
    weights = [p.detach().clone().requires_grad_(True) for p in m._flat_weights]
    ln_names = ln_weight_names(mode, 2, True)
    ln = [getattr(m, n).detach().clone().requires_grad_(True) for n in ln_names]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = states(mode, m, 2)
    h0.requires_grad_(True)
    lengths = torch.tensor([3, 2])
    nw = len(weights)

    if mode == "lstm":
        c0.requires_grad_(True)

        def fn(x, h0, c0, *params):
            y, (h, c) = layernorm_lstm(
                x,
                (h0, c0),
                params[:nw],
                params[nw:],
                num_layers=2,
                bidirectional=True,
                lengths=lengths,
            )
            return y, h, c

        args = (x, h0, c0, *weights, *ln)
    else:

        def fn(x, h0, *params):
            y, h = layernorm_gru(
                x, h0, params[:nw], params[nw:], num_layers=2, bidirectional=True, lengths=lengths
            )
            return y, h

        args = (x, h0, *weights, *ln)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_variable_lengths_and_packed(mode):
    """Padded steps change no state and output zeros; PackedSequence input gives the same."""
    m = make_module(mode, num_layers=2, bidirectional=True)
    steps, batch = 6, 4
    x = torch.randn(steps, batch, 3, dtype=torch.float64)
    h0, c0 = states(mode, m, batch)
    lengths = torch.tensor([6, 2, 5, 1])
    ours = run_module(mode, m.eval(), x, h0, c0)  # no lengths: differs from the padded run
    hx = (h0, c0) if mode == "lstm" else h0
    functional = layernorm_lstm if mode == "lstm" else layernorm_gru
    ln = [getattr(m, n) for n in m._ln_names]
    y, hn = functional(
        x, hx, m._flat_weights, ln, num_layers=2, bidirectional=True, lengths=lengths
    )
    got = (y, *hn) if mode == "lstm" else (y, hn)
    named = dict(m.named_parameters())
    ref = plain_reference(mode, x, h0, c0, named, num_layers=2, bidirectional=True, lengths=lengths)
    for a, b in zip(got, [r for r in ref if r is not None], strict=True):
        assert_close(a, b)
    assert (got[0][2:, 1] == 0).all() and (got[0][1:, 3] == 0).all()
    assert (ours[1] - got[1]).abs().max() > 1e-6  # lengths do change the final states
    # Garbage in the padded steps changes nothing.
    x_garbage = x.clone()
    x_garbage[2:, 1] = 1e3
    y2, hn2 = functional(
        x_garbage, hx, m._flat_weights, ln, num_layers=2, bidirectional=True, lengths=lengths
    )
    assert_close(y2, y, 0.0)
    # PackedSequence through the module.
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_packed, hn_packed = m(packed, hx)
    y_packed, _ = pad_packed_sequence(out_packed, total_length=steps)
    assert_close(y_packed, y)
    for a, b in zip(hn_packed if mode == "lstm" else (hn_packed,), got[1:], strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_dropout_between_layers(mode):
    """Training mode drops layer outputs between layers (same RNG stream as F.dropout);
    eval mode and the last layer are untouched."""
    m = make_module(mode, num_layers=3, bidirectional=True, dropout=0.5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0, c0 = states(mode, m, 2)
    m.train()
    torch.manual_seed(123)
    got = run_module(mode, m, x, h0, c0)
    # The masks F.dropout drew, replayed: one (T, B, 2H) draw per layer gap, in order.
    torch.manual_seed(123)
    masks = [F.dropout(torch.ones(4, 2, 8, dtype=torch.float64), 0.5) for _ in range(2)]
    named = dict(m.named_parameters())
    ref = plain_reference(
        mode, x, h0, c0, named, num_layers=3, bidirectional=True, dropout_masks=masks
    )
    for a, b in zip(got, [r for r in ref if r is not None], strict=True):
        assert_close(a, b)
    m.eval()
    ref_eval = plain_reference(mode, x, h0, c0, named, num_layers=3, bidirectional=True)
    assert_close(run_module(mode, m, x, h0, c0)[0], ref_eval[0])
    assert (got[0] - ref_eval[0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_unbatched_and_default_state(mode):
    m = make_module(mode, num_layers=2, bidirectional=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, hn = m(x)
    h0 = torch.zeros(2, 1, 4, dtype=torch.float64)
    ref = plain_reference(
        mode,
        x[:, None],
        h0,
        h0.clone(),
        dict(m.named_parameters()),
        num_layers=2,
        bidirectional=False,
    )
    assert y.shape == (5, 4)
    assert_close(y, ref[0][:, 0])
    assert_close(hn[0] if mode == "lstm" else hn, ref[1][:, 0])


# ---- low precision through the harness -----------------------------------------------------------


def harness_case(
    mode,
    *,
    num_layers=2,
    bidirectional=True,
    steps=7,
    batch=5,
    input_size=9,
    hidden=33,
    lengths=True,
):
    """The op as a harness case; backend "reference" is the plain reference, any other name is
    layernorm_lstm/gru with that LayerNorm backend."""
    shapes = make_module(
        mode,
        num_layers=num_layers,
        bidirectional=bidirectional,
        input_size=input_size,
        hidden=hidden,
    )
    names = [n for n, _ in shapes.named_parameters()]
    param_shapes = [p.shape for p in shapes.parameters()]
    flat_count = len(shapes._flat_weights)
    dirs = 2 if bidirectional else 1

    def make_inputs(gen):
        out = {"x": torch.randn(steps, batch, input_size, generator=gen, dtype=torch.float64)}
        out["h0"] = torch.randn(
            num_layers * dirs, batch, hidden, generator=gen, dtype=torch.float64
        )
        if mode == "lstm":
            out["c0"] = torch.randn(out["h0"].shape, generator=gen, dtype=torch.float64)
        for name, shape in zip(names, param_shapes):
            scale = 0.5 if name.startswith("ln_") else hidden**-0.5
            base = 1.0 if "_weight_" in name and name.startswith("ln_") else 0.0
            out[name] = base + scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        if lengths:
            lens = torch.randint(1, steps + 1, (batch,), generator=gen)
            lens[0] = steps
            out["lengths"] = lens
        return out

    def call(backend, x, h0, c0=None, lengths=None, **params):
        if backend == "reference":
            y, h, c = plain_reference(
                mode,
                x,
                h0,
                c0,
                params,
                num_layers=num_layers,
                bidirectional=bidirectional,
                lengths=lengths,
            )
            return (y, h, c) if mode == "lstm" else (y, h)
        values = [params[n] for n in names]
        flat, ln = values[:flat_count], values[flat_count:]
        kw = dict(
            num_layers=num_layers, bidirectional=bidirectional, lengths=lengths, backend=backend
        )
        if mode == "lstm":
            y, (h, c) = layernorm_lstm(x, (h0, c0), flat, ln, **kw)
            return y, h, c
        return layernorm_gru(x, h0, flat, ln, **kw)

    grads = ("x", "h0") + (("c0",) if mode == "lstm" else ()) + tuple(names)
    return OpCase(f"layernorm_{mode}", call, make_inputs, grad=grads)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_harness_torch_layer_norm(mode, dtype):
    """fp32 / bf16 / fp16 (fp32 state inside) against the fp64 plain reference: outputs, final
    states and every gradient within the harness bound, LayerNorm on the ``torch`` backend."""
    check_backend(harness_case(mode), "torch", dtype)


@pytest.fixture(scope="module")
def extension():
    if ext.load_extension() is None:
        pytest.skip(f"C++ extension unavailable: {ext.extension_status(build=False)[1]}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_harness_cpu_layer_norm_kernel(extension, mode, dtype):
    """The same through turbolm's C++ LayerNorm kernels (``backend="cpu"``)."""
    check_backend(harness_case(mode, num_layers=1, hidden=17), "cpu", dtype)


def test_named_layer_norm_backend_is_used():
    """``backend=`` reaches turbolm's LayerNorm dispatch: a backend that cannot run raises."""
    m = make_module("lstm", num_layers=1, bidirectional=False, dtype=torch.float32)
    x = torch.randn(2, 1, 3)
    ln = [getattr(m, n) for n in m._ln_names]
    with pytest.raises(BackendError):
        layernorm_lstm(x, None, m._flat_weights, ln, num_layers=1, backend="cuda")


# ---- module surface ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 2, "bidirectional": True, "bias": False}])
def test_state_dict_keys(mode, kwargs):
    ours_cls, torch_cls = CLASSES[mode]
    theirs = torch_cls(3, 4, **kwargs)
    off = ours_cls(3, 4, **kwargs)
    assert list(off.state_dict()) == list(theirs.state_dict())
    assert list(ours_cls(3, 4, layer_norm=False, **kwargs).state_dict()) == list(
        theirs.state_dict()
    )
    assert repr(off) == repr(theirs)
    on = ours_cls(3, 4, layer_norm=True, **kwargs)
    extra = [k for k in on.state_dict() if k not in theirs.state_dict()]
    assert extra == ln_weight_names(
        mode, kwargs.get("num_layers", 1), kwargs.get("bidirectional", False)
    )
    assert "layer_norm=True" in repr(on)
    # LayerNorm gains 1 and shifts 0, also after reset_parameters (torch re-draws everything).
    on.reset_parameters()
    for name in extra:
        fill = 1.0 if "_weight_" in name else 0.0
        assert (getattr(on, name) == fill).all(), name
    gates = {"lstm": 4, "gru": 3}[mode] * 4
    assert on.ln_ih_weight_l0.shape == (gates,) and on.ln_hh_bias_l0.shape == (gates,)
    if mode == "lstm":
        assert on.ln_c_weight_l0.shape == (4,)
    # A torch.nn checkpoint loads non-strictly; the LayerNorm keys are the missing ones.
    result = on.load_state_dict(theirs.state_dict(), strict=False)
    assert result.missing_keys == extra and not result.unexpected_keys
    assert on.weight_hh_l0.data_ptr() != theirs.weight_hh_l0.data_ptr()
    assert torch.equal(on.weight_hh_l0, theirs.weight_hh_l0)


def test_module_moves_and_casts():
    m = LSTM(3, 4, layer_norm=True).to(torch.float64)
    assert m.ln_c_bias_l0.dtype == torch.float64 and m.weight_ih_l0.dtype == torch.float64
    y, _ = m(torch.randn(2, 1, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_errors():
    with pytest.raises(InputError, match="proj_size"):
        LSTM(3, 4, proj_size=2, layer_norm=True)
    with pytest.raises(InputError, match="layer_norm must be True or False"):
        GRU(3, 4, layer_norm="yes")
    with pytest.raises(InputError, match="layer_norm_eps"):
        GRU(3, 4, layer_norm=True, layer_norm_eps=-1.0)
    with pytest.raises(TypeError):
        RNN(3, 4, layer_norm=True)  # no LayerNorm-Elman variant
    m = make_module("lstm", num_layers=1, bidirectional=False, dtype=torch.float32)
    ln = [getattr(m, n) for n in m._ln_names]
    x = torch.randn(2, 1, 3)
    with pytest.raises(InputError, match="ln_weights must hold 6"):
        layernorm_lstm(x, None, m._flat_weights, ln[:4], num_layers=1)
    with pytest.raises(DTypeError, match="ln_c_bias_l0"):
        layernorm_lstm(x, None, m._flat_weights, ln[:5] + [ln[5].double()], num_layers=1)
    with pytest.raises(InputError, match="proj_size"):
        layernorm_lstm(x, None, m._flat_weights, ln, num_layers=1, proj_size=1)
    with pytest.raises(InputError, match="eps"):
        layernorm_lstm(x, None, m._flat_weights, ln, num_layers=1, eps=float("nan"))


# ---- the language model --------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnlm_layer_norm_trains(cell):
    from turbolm.models.rnn import RNNLM, RNNConfig

    torch.manual_seed(0)
    config = RNNConfig(
        vocab_size=24, cell=cell, n_layer=2, d_embed=12, d_hidden=16, context=12, layer_norm=True
    )
    model = RNNLM(config)
    assert model.rnn.layer_norm and any(
        n.startswith("rnn.ln_hh_") for n, _ in model.named_parameters()
    )
    # LayerNorm parameters are 1-D: no weight decay for them.
    decayed = {
        id(p)
        for g in model.configure_optimizer_groups(0.1)
        if g["weight_decay"] > 0
        for p in g["params"]
    }
    assert id(model.rnn.ln_ih_weight_l0) not in decayed
    idx = torch.randint(0, 24, (4, 13))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses
    # step() over the same tokens from init_state equals forward.
    model.eval()
    logits, _ = model(idx[:, :6])
    stepped, state = model.step(idx[:, :3], model.init_state(4))
    stepped2, _ = model.step(idx[:, 3:6], state)
    torch.testing.assert_close(torch.cat([stepped, stepped2], 1), logits, rtol=1e-5, atol=1e-5)


def test_rnnlm_config_errors():
    from turbolm.models.rnn import RNNConfig

    with pytest.raises(ConfigError, match="layer_norm"):
        RNNConfig(vocab_size=10, cell="rnn_tanh", layer_norm=True)
    with pytest.raises(ConfigError, match="layer_norm must be true or false"):
        RNNConfig(vocab_size=10, layer_norm=1)


def test_run_config_option():
    """``model.rnn_layer_norm`` in a run config reaches the model; bad values are readable."""
    from turbolm.config import load_config, model_kwargs
    from turbolm.models import build_model

    cfg = load_config(None, ["model.arch=rnn", "model.cell=gru", "model.rnn_layer_norm=true"])
    model = build_model(model_kwargs(cfg.model, 50))
    assert isinstance(model.rnn, GRU) and model.rnn.layer_norm
    plain = load_config(None, ["model.arch=rnn"])
    assert "layer_norm" not in model_kwargs(plain.model, 50)  # old model args unchanged
    assert not build_model(model_kwargs(plain.model, 50)).rnn.layer_norm
    with pytest.raises(ConfigError, match="model.rnn_layer_norm"):
        load_config(None, ["model.arch=rnn", "model.cell=rnn_relu", "model.rnn_layer_norm=true"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["model.arch=rnn", "model.rnn_layer_norm=maybe"])


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_autocast_input_from_an_autocast_op(mode):
    """Under CPU bf16 autocast an input made bf16 by a Linear meets fp32 weights: the
    LayerNorm recurrences run in bf16 (as the plain ones and torch.nn do; was a DTypeError)."""
    torch.manual_seed(0)
    cls = LSTM if mode == "lstm" else GRU
    rnn = cls(6, 5, num_layers=2, layer_norm=True, batch_first=True)
    proj = torch.nn.Linear(4, 6)
    x = torch.randn(3, 7, 4)
    want, _ = rnn(proj(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(x)
        got, states = rnn(h)
    assert got.dtype == h.dtype == torch.bfloat16
    # the same computation as a bf16 copy of the module, and bf16-close to fp32
    same, _ = copy.deepcopy(rnn).bfloat16()(h.detach())
    torch.testing.assert_close(got, same)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.1)
    got.float().sum().backward()
    assert rnn.weight_ih_l0.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in rnn.parameters())
