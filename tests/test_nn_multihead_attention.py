"""Drop-in ``turbolm.nn.MultiheadAttention``: the fast path (turbolm.ops.attention) equals
torch.nn.MultiheadAttention in outputs and gradients, the fall-back cases are torch's own,
state_dict / ``__class__`` swaps, and a swapped ``nn.TransformerEncoderLayer`` trains."""

from __future__ import annotations

import copy

import pytest
import torch

import turbolm
import turbolm.nn.multihead_attention as mha_module
from turbolm.errors import BackendError
from turbolm.nn import MultiheadAttention

BACKENDS = ("reference", "torch")
E, H = 16, 4  # embed_dim, num_heads (head_dim 4)
TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
    torch.float32: {"rtol": 1e-4, "atol": 2e-5},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads (and a busy CI machine makes them slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of turbolm.ops.attention made by the module."""
    calls = []
    original = mha_module.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(mha_module, "attention", counting)
    return calls


def make_pair(dtype=torch.float64, **kwargs):
    """A torch.nn.MultiheadAttention and its turbolm twin holding the same random weights
    (biases too, so they are not zero)."""
    theirs = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = MultiheadAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def leaves(tensors):
    """Fresh requires-grad copies, keeping `is` identities (self- / cross-attention)."""
    made = {}
    return [made.setdefault(id(t), t.detach().clone().requires_grad_()) for t in tensors]


def run_and_grads(module, qkv, kwargs, upstream=None):
    """Output of module(*qkv, **kwargs) and the gradients of (output * upstream).sum() w.r.t.
    the distinct inputs and every parameter."""
    q, k, v = leaves(qkv)
    out, weights = module(q, k, v, **kwargs)
    upstream = torch.randn_like(out) if upstream is None else upstream
    (out * upstream).sum().backward()
    inputs = list({id(t): t for t in (q, k, v)}.values())
    grads = [t.grad for t in inputs] + [p.grad for p in module.parameters()]
    return out, weights, grads, upstream


def assert_matches_torch(ours, theirs, qkv, kwargs, dtype):
    got, got_w, got_grads, upstream = run_and_grads(ours, qkv, kwargs)
    want, _, want_grads, _ = run_and_grads(theirs, qkv, kwargs, upstream)
    assert got_w is None
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    names = [f"input{i}" for i in range(len(got_grads) - len(list(ours.parameters())))]
    names += [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


# ---- fast-path cases ------------------------------------------------------------------------
# Each returns (module kwargs, (query, key, value) batch-first (B, T, C), forward kwargs);
# B = 3, L = 5, S = 5 (self) or 6 (cross).


def _x(b, t, c, dtype):
    return torch.randn(b, t, c, dtype=dtype)


def _bool_kpm(s=5):
    kpm = torch.zeros(3, s, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    return kpm


def _float(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))


def _bool_attn(lq=5, s=5, heads=None):
    shape = (lq, s) if heads is None else (heads, lq, s)
    m = torch.rand(shape) < 0.3
    m[..., 0] = False  # every row keeps a key
    return m


def case_self(dtype):
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {}


def case_self_nobias(dtype):
    x = _x(3, 5, E, dtype)
    return {"bias": False}, (x, x, x), {}


def case_cross(dtype):  # encoder-decoder: key is value, different length
    return {}, (_x(3, 5, E, dtype), *[_x(3, 6, E, dtype)] * 2), {}


def case_qkv_distinct(dtype):
    return {}, (_x(3, 5, E, dtype), _x(3, 6, E, dtype), _x(3, 6, E, dtype)), {}


def case_kdim_vdim(dtype):
    return {"kdim": 5, "vdim": 7}, (_x(3, 5, E, dtype), _x(3, 6, 5, dtype), _x(3, 6, 7, dtype)), {}


def case_kdim_vdim_nobias_masks(dtype):
    q, k, v = _x(3, 5, E, dtype), _x(3, 6, 5, dtype), _x(3, 6, 7, dtype)
    fwd = {"key_padding_mask": _bool_kpm(6), "attn_mask": _bool_attn(5, 6)}
    return {"kdim": 5, "vdim": 7, "bias": False}, (q, k, v), fwd


def case_kpm_bool(dtype):
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {"key_padding_mask": _bool_kpm()}


def case_kpm_float(dtype):
    x = _x(3, 5, E, dtype)
    kpm = torch.randn(3, 5, dtype=dtype).masked_fill(_bool_kpm(), float("-inf"))
    return {}, (x, x, x), {"key_padding_mask": kpm}


def case_attn_2d_bool(dtype):
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {"attn_mask": _bool_attn()}


def case_attn_2d_float(dtype):
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {"attn_mask": torch.randn(5, 5, dtype=dtype)}


def case_attn_3d_bool(dtype):
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {"attn_mask": _bool_attn(heads=3 * H)}


def case_attn_3d_float(dtype):
    x = _x(3, 5, E, dtype)
    mask = torch.randn(3 * H, 5, 5, dtype=dtype).masked_fill(_bool_attn(heads=3 * H), -1e4)
    return {}, (x, x, x), {"attn_mask": mask}


def case_both_bool_cross(dtype):
    q, kv = _x(3, 5, E, dtype), _x(3, 6, E, dtype)
    fwd = {"key_padding_mask": _bool_kpm(6), "attn_mask": _bool_attn(5, 6, heads=3 * H)}
    return {}, (q, kv, kv), fwd


def case_both_float(dtype):
    x = _x(3, 5, E, dtype)
    fwd = {
        "key_padding_mask": _float(_bool_kpm(), dtype),
        "attn_mask": torch.randn(5, 5, dtype=dtype),
    }
    return {}, (x, x, x), fwd


def case_causal(dtype):  # is_causal with its mask, no key_padding_mask: SDPA's causal
    x = _x(3, 5, E, dtype)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=dtype)
    return {}, (x, x, x), {"attn_mask": causal, "is_causal": True}


def case_causal_hint_overrides_mask(dtype):  # torch ignores attn_mask when is_causal and no kpm
    x = _x(3, 5, E, dtype)
    return {}, (x, x, x), {"attn_mask": _bool_attn(), "is_causal": True}


def case_causal_cross_lengths(dtype):  # L != S: SDPA's causal is top-left aligned
    q, kv = _x(3, 5, E, dtype), _x(3, 7, E, dtype)
    mask = torch.ones(5, 7, dtype=torch.bool).triu(1)
    return {}, (q, kv, kv), {"attn_mask": mask, "is_causal": True}


def case_causal_with_kpm(dtype):  # torch drops the is_causal hint and uses attn_mask + kpm
    x = _x(3, 5, E, dtype)
    fwd = {"attn_mask": _bool_attn(), "key_padding_mask": _bool_kpm(), "is_causal": True}
    return {}, (x, x, x), fwd


def case_fully_masked_rows_bool(dtype):  # batch 1 sees no key; row 2 of the mask none either
    x = _x(3, 5, E, dtype)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1] = True
    attn = torch.zeros(5, 5, dtype=torch.bool)
    attn[2] = True
    return {}, (x, x, x), {"key_padding_mask": kpm, "attn_mask": attn}


def case_fully_masked_rows_float(dtype):
    x = _x(3, 5, E, dtype)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1] = True
    attn = torch.randn(3 * H, 5, 5, dtype=dtype)
    attn[4, 3] = float("-inf")
    return {}, (x, x, x), {"key_padding_mask": _float(kpm, dtype), "attn_mask": attn}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def to_layout(qkv, batch_first):
    """Batch-first tensors -> the module's layout, keeping `is` identities."""
    if batch_first:
        return qkv
    made = {}
    return [made.setdefault(id(t), t.transpose(0, 1).contiguous()) for t in qkv]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_torch_float64(case, batch_first, backend, op_calls):
    torch.manual_seed(0)
    module_kwargs, qkv, fwd = CASES[case](torch.float64)
    ours, theirs = make_pair(batch_first=batch_first, **module_kwargs)
    qkv = to_layout(qkv, batch_first)
    kwargs = {**fwd, "need_weights": False}
    assert ours.why_not_fast_path(*qkv, **kwargs) is None
    with turbolm.use_backend(backend):
        assert_matches_torch(ours, theirs, qkv, kwargs, torch.float64)
    assert len(op_calls) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["self", "kdim_vdim_nobias_masks", "both_float", "causal", "fully_masked_rows_bool"]
)
def test_fast_path_matches_torch_float32(case, backend, op_calls):
    torch.manual_seed(1)
    module_kwargs, qkv, fwd = CASES[case](torch.float32)
    ours, theirs = make_pair(torch.float32, batch_first=True, **module_kwargs)
    with turbolm.use_backend(backend):
        assert_matches_torch(ours, theirs, qkv, {**fwd, "need_weights": False}, torch.float32)
    assert len(op_calls) == 1


def _unbatched(qkv):
    made = {}
    return [made.setdefault(id(t), t[0]) for t in qkv]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "case", ["self", "cross", "kdim_vdim", "kpm_float", "attn_2d_bool", "causal_cross_lengths"]
)
def test_unbatched_matches_torch(case, batch_first, backend, op_calls):
    torch.manual_seed(2)
    module_kwargs, qkv, fwd = CASES[case](torch.float64)
    ours, theirs = make_pair(batch_first=batch_first, **module_kwargs)
    qkv = _unbatched(qkv)
    if "key_padding_mask" in fwd:
        fwd["key_padding_mask"] = fwd["key_padding_mask"][0]  # (S,)
    kwargs = {**fwd, "need_weights": False}
    with turbolm.use_backend(backend):
        assert_matches_torch(ours, theirs, qkv, kwargs, torch.float64)
    assert len(op_calls) == 1


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64])
def test_unbatched_3d_attn_mask(mask_dtype, op_calls):
    torch.manual_seed(3)
    ours, theirs = make_pair()
    x = torch.randn(5, E, dtype=torch.float64)
    mask = _bool_attn(heads=H)
    mask = mask if mask_dtype == torch.bool else _float(mask, mask_dtype)
    kwargs = {"attn_mask": mask, "need_weights": False}
    assert_matches_torch(ours, theirs, (x, x, x), kwargs, torch.float64)
    assert len(op_calls) == 1


def test_fully_masked_rows_output_out_proj_bias():
    """Rows that see no key give a zero attention output, like torch's SDPA path on CPU (torch's
    native eval fast path would give NaN there; see the module docstring)."""
    torch.manual_seed(4)
    ours, _ = make_pair(batch_first=True)
    _, (x, _, _), fwd = case_fully_masked_rows_bool(torch.float64)
    out, _ = ours(x, x, x, need_weights=False, **fwd)
    bias = ours.out_proj.bias.detach()
    torch.testing.assert_close(out[1], bias.expand(5, E))
    torch.testing.assert_close(out[:, 2], bias.expand(3, E))
    assert out.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_mask_dtypes_warn_like_torch(backend, op_calls):
    torch.manual_seed(5)
    ours, theirs = make_pair(batch_first=True)
    x = torch.randn(3, 5, E, dtype=torch.float64)
    fwd = {"key_padding_mask": _bool_kpm(), "attn_mask": torch.randn(5, 5, dtype=torch.float64)}
    with turbolm.use_backend(backend), pytest.warns(UserWarning, match="mismatched"):
        got, _ = ours(x, x, x, need_weights=False, **fwd)
    with pytest.warns(UserWarning, match="mismatched"):
        want, _ = theirs(x, x, x, need_weights=False, **fwd)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert len(op_calls) == 1


def test_eval_no_grad_takes_the_fast_path(op_calls):
    torch.manual_seed(6)
    ours, theirs = make_pair(batch_first=True)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 5, E, dtype=torch.float64)
    with torch.no_grad():
        got, _ = ours(x, x, x, need_weights=False, key_padding_mask=_bool_kpm())
        want, _ = theirs(x, x, x, need_weights=False, key_padding_mask=_bool_kpm())
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert len(op_calls) == 1


# ---- dropout --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_under_manual_seed(backend, op_calls):
    torch.manual_seed(7)
    ours, _ = make_pair(dropout=0.4, batch_first=True)
    x = torch.randn(3, 5, E, dtype=torch.float64)
    with turbolm.use_backend(backend):
        torch.manual_seed(123)
        a, _ = ours(x, x, x, need_weights=False)
        torch.manual_seed(123)
        b, _ = ours(x, x, x, need_weights=False)
        torch.manual_seed(321)
        c, _ = ours(x, x, x, need_weights=False)
        ours.eval()
        plain, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, plain)
    assert [call["dropout_p"] for call in op_calls] == [0.4, 0.4, 0.4, 0.0]


# ---- fall-backs -----------------------------------------------------------------------------


def _fallback_cases():
    x = torch.randn(3, 5, E, dtype=torch.float64)
    kpm = _bool_kpm()
    return {
        "need_weights_default": ({}, (x, x, x), {"key_padding_mask": kpm}),
        "need_weights_not_averaged": ({}, (x, x, x), {"average_attn_weights": False}),
        "add_bias_kv": ({"add_bias_kv": True}, (x, x, x), {"need_weights": False}),
        "add_zero_attn": ({"add_zero_attn": True}, (x, x, x), {"need_weights": False}),
        "float32_mask_with_float64_inputs": (
            {},
            (x, x, x),
            {"need_weights": False, "attn_mask": torch.randn(5, 5)},
        ),
    }


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_fall_back_cases_are_torch(case, op_calls):
    torch.manual_seed(8)
    module_kwargs, qkv, fwd = _fallback_cases()[case]
    ours, theirs = make_pair(batch_first=True, **module_kwargs)
    assert ours.why_not_fast_path(*qkv, **{k: v for k, v in fwd.items() if "average" not in k})
    ours.eval(), theirs.eval()  # no dropout: the results must be identical
    got, got_w = ours(*qkv, **fwd)
    want, want_w = theirs(*qkv, **fwd)
    assert torch.equal(got, want)
    assert (got_w is None and want_w is None) or torch.equal(got_w, want_w)
    assert op_calls == []


def test_fall_back_errors_are_torch(op_calls):
    ours, theirs = make_pair()
    x = torch.randn(5, 3, E, dtype=torch.float64)
    for module in (ours, theirs):  # is_causal needs attn_mask
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            module(x, x, x, need_weights=False, is_causal=True)
    for module in (ours, theirs):  # wrong attn_mask shape
        with pytest.raises(RuntimeError, match="2D attn_mask"):
            module(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    for module in (ours, theirs):  # wrong embedding size
        with pytest.raises(AssertionError):
            module(x[..., :8], x[..., :8], x[..., :8], need_weights=False)
    assert op_calls == []


def test_named_backend_that_cannot_run_raises():
    """The fast path really goes through the op's registry: a named backend never falls back
    (triton takes no attention mask; a key_padding_mask becomes one)."""
    ours, _ = make_pair(torch.float32)
    x = torch.randn(5, 3, E)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -1] = True
    with turbolm.use_backend("triton"), pytest.raises(BackendError, match="backend 'triton'"):
        ours(x, x, x, need_weights=False, key_padding_mask=padding)


# ---- drop-in: state_dict and __class__ swap -------------------------------------------------


@pytest.mark.parametrize(
    "module_kwargs", [{}, {"kdim": 5, "vdim": 7, "bias": False}, {"add_bias_kv": True}]
)
def test_state_dict_round_trip(module_kwargs):
    theirs = torch.nn.MultiheadAttention(E, H, **module_kwargs)
    ours = MultiheadAttention(E, H, **module_kwargs)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fresh = torch.nn.MultiheadAttention(E, H, **module_kwargs)
    fresh.load_state_dict(ours.state_dict())
    for a, b in zip(fresh.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


@pytest.mark.parametrize("batch_first", [False, True])
def test_class_swap_of_existing_instance(batch_first, op_calls):
    torch.manual_seed(9)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    swapped = copy.deepcopy(theirs)
    before = dict(swapped.__dict__)
    swapped.__class__ = MultiheadAttention
    assert swapped.__dict__ == before  # nothing else changed
    (x, _, _) = to_layout([torch.randn(3, 5, E, dtype=torch.float64)] * 3, batch_first)
    fwd = {"need_weights": False, "key_padding_mask": _bool_kpm(), "attn_mask": _bool_attn()}
    assert_matches_torch(swapped, theirs, (x, x, x), fwd, torch.float64)
    assert len(op_calls) == 1
    # need_weights=True still works (torch's forward)
    got, w = swapped(x, x, x)
    want, w_want = theirs(x, x, x)
    assert torch.equal(got, want) and torch.equal(w, w_want)


def test_transformer_encoder_layer_with_swapped_self_attn_trains(op_calls):
    """nn.TransformerEncoderLayer calls self_attn with need_weights=False: the swapped layer takes
    the fast path, matches the unswapped layer in training mode, and trains the same way."""
    torch.manual_seed(10)
    theirs = torch.nn.TransformerEncoderLayer(
        E, H, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=torch.float64
    )
    ours = copy.deepcopy(theirs)
    ours.self_attn.__class__ = MultiheadAttention
    x = torch.randn(3, 5, E, dtype=torch.float64)
    kpm = _bool_kpm()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(3):
        losses = []
        for layer, opt in zip((ours, theirs), opts):
            layer.train()
            opt.zero_grad()
            if step == 0:
                out = layer(x, src_key_padding_mask=kpm)
            elif step == 1:
                out = layer(x, src_mask=causal, is_causal=True)
            else:
                out = layer(x)
            loss = out.square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], **TOL[torch.float64])
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(p, q, **TOL[torch.float64], msg=name)
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64], msg=name)
    assert len(op_calls) == 3


def test_torchscript_is_refused_with_a_clear_error():
    """TorchScript cannot compile the forward: a typed error that says what to do instead;
    the model is left as it was."""
    from turbolm.errors import InputError
    from turbolm.patching import apply_turbolm, revert_turbolm

    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0)
    apply_turbolm(layer, norm=False)
    with pytest.raises(InputError, match="torch.jit.script.*revert_turbolm"):
        torch.jit.script(layer)
    assert type(layer.self_attn) is MultiheadAttention
    revert_turbolm(layer)
    torch.jit.script(layer)
