"""turbolm.ops.attention: the torch backend against the fp64 reference, gradcheck, errors,
dropout."""

from __future__ import annotations

import pytest
import torch

from tests.harness import OpCase, check_backend
from turbolm.errors import DeviceError, DTypeError, ShapeError
from turbolm.ops import attention
from turbolm.ops.attention import attention_reference

DTYPES = [torch.float32, torch.bfloat16]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (Hq, Hkv)
# (Tq, Tk): equal, fewer queries than keys (decoding), more queries than keys.
SEQS = [(1, 1), (17, 17), (64, 64), (1, 64), (17, 64), (64, 17), (17, 1)]


def attention_case(
    tq, tk, hq, hkv, d, causal, mask=None, scale=None, magnitude=1.0, transposed=False
) -> OpCase:
    """``mask``: None, "float" (additive, broadcast over heads) or "bool" (per head).
    ``transposed``: q/k/v are (B, T, H, D) tensors viewed as (B, H, T, D) (non-contiguous, as
    the attention module passes them). ``magnitude`` scales q and k (peaky softmax)."""
    batch = 2

    def make_inputs(gen):
        def randn(b, h, t, d, factor=1.0):
            if transposed:
                x = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)
            else:
                x = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
            return x * factor if factor != 1.0 else x

        inputs = {
            "q": randn(batch, hq, tq, d, magnitude),
            "k": randn(batch, hkv, tk, d, magnitude),
            "v": randn(batch, hkv, tk, d),
        }
        if mask == "float":
            inputs["attn_mask"] = torch.randn(batch, 1, tq, tk, generator=gen, dtype=torch.float64)
        elif mask == "bool":
            allowed = torch.rand(batch, hq, tq, tk, generator=gen) > 0.3
            allowed[..., 0] = True  # every row sees a key (else the row is zero either way)
            inputs["attn_mask"] = allowed
        return inputs

    def call(backend, q, k, v, attn_mask=None):
        if transposed:
            assert not q.is_contiguous()
        return attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale, backend=backend)

    name = f"attn[{tq}x{tk},h{hq}/{hkv},d{d},causal={causal},mask={mask}]"
    return OpCase(name, call, make_inputs, grad=("q", "k", "v"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tq,tk", SEQS)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_seq_lengths(causal, tq, tk, dtype):
    check_backend(attention_case(tq, tk, 4, 2, 16, causal), "torch", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", list(HEADS), ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_mha_gqa_mqa(causal, heads, dtype):
    hq, hkv = HEADS[heads]
    check_backend(attention_case(17, 64, hq, hkv, 16, causal), "torch", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_head_dims(causal, d, dtype):
    check_backend(attention_case(64, 64, 4, 1, d, causal), "torch", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["float", "bool"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_masks(causal, mask, dtype):
    check_backend(attention_case(17, 33, 4, 2, 80, causal, mask), "torch", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_scale_magnitude_layout(causal, dtype):
    """Custom softmax scale, large q/k (peaky softmax), non-contiguous (B, T, H, D) views."""
    check_backend(attention_case(17, 17, 2, 2, 16, causal, "bool", scale=0.3), "torch", dtype)
    check_backend(attention_case(17, 40, 4, 2, 16, causal, magnitude=4.0), "torch", dtype)
    check_backend(attention_case(33, 33, 4, 1, 16, causal, transposed=True), "torch", dtype)


GRADCHECK_CASES = [
    (False, 3, 3, None),
    (True, 3, 3, "bool"),
    (True, 2, 5, "float"),
    (True, 5, 2, None),
    (False, 5, 2, "bool"),
    (False, 2, 5, "float"),
]


@pytest.mark.parametrize("causal,tq,tk,mask", GRADCHECK_CASES)
def test_gradcheck(causal, tq, tk, mask):
    """Full fp64 gradcheck of the reference; fast-mode gradcheck of the torch backend."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, tq, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, tk, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, tk, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    attn_mask = None
    if mask == "float":
        attn_mask = torch.randn(1, 2, tq, tk, generator=gen, dtype=torch.float64)
    elif mask == "bool":
        attn_mask = torch.rand(1, 1, tq, tk, generator=gen) > 0.4
    inputs = (q, k, v)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_reference(q, k, v, causal=causal, attn_mask=attn_mask), inputs
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, causal=causal, attn_mask=attn_mask, backend="torch"),
        inputs,
        fast_mode=True,
    )


def test_causal_is_bottom_right_aligned():
    """With a cache of Tk keys, the last of Tq new queries sees all keys, the first Tk-Tq+1."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, t, 8, generator=gen) for t in (3, 7, 7))
    full = attention(q, k, v, causal=True, backend="reference")
    for i in range(3):
        visible = 7 - 3 + i + 1
        row = attention(q[:, :, i : i + 1], k[:, :, :visible], v[:, :, :visible])
        torch.testing.assert_close(full[:, :, i : i + 1], row)


def test_rows_without_keys_are_zero():
    q, k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    for backend in ("reference", "torch"):
        out = attention(q, k, v, causal=True, backend=backend)
        assert torch.equal(out[:, :, :3], torch.zeros(1, 1, 3, 8))


# ---------------------------------------------------------------------------------------------
# errors


def test_integer_input_is_dtype_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(DTypeError, match="q"):
        attention(q.long(), q, q)
    with pytest.raises(DTypeError):
        attention(q, q.half(), q)


def test_heads_not_divisible_is_shape_error():
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ShapeError, match="multiple"):
        attention(q, kv, kv)
    with pytest.raises(ShapeError):
        attention(q, torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16))
    with pytest.raises(ShapeError):
        attention(q[0], q[0], q[0])
    with pytest.raises(ShapeError, match="attn_mask"):
        attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_device_mismatch_is_device_error():
    q = torch.randn(1, 2, 4, 8)
    meta = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(DeviceError, match="meta"):
        attention(q, meta, meta)
    with pytest.raises(DeviceError):
        attention(q, q, q, attn_mask=torch.empty(4, 4, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dropout_same_seed_same_output(backend):
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    torch.manual_seed(123)
    a = attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    torch.manual_seed(123)
    b = attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    torch.manual_seed(124)
    c = attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dropout_is_unbiased(backend):
    """Averaged over many dropout masks (a large batch of one repeated input), the output
    approaches the output without dropout."""
    torch.manual_seed(0)
    n = 4000
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    expected = attention(q, k, v, causal=True, backend=backend)
    qs, ks, vs = (t.expand(n, -1, -1, -1) for t in (q, k, v))
    mean = attention(qs, ks, vs, causal=True, dropout_p=0.25, backend=backend).mean(0)
    assert (mean - expected[0]).abs().max() < 0.12
    single = attention(q, k, v, causal=True, dropout_p=0.25, backend=backend)
    assert not torch.allclose(single, expected)


def test_torch_backend_keeps_padding_masks_small(monkeypatch):
    """A (B, 1, Tq, Tk) boolean padding mask reaches SDPA as it is (boolean, not expanded over
    the heads into an additive float mask), and grouped k/v heads are not repeated on CPU."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((tuple(k.shape), None if attn_mask is None else attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q = torch.randn(2, 8, 5, 16)
    k = v = torch.randn(2, 2, 5, 16)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False  # left padding: rows 0-1 of batch 0 see nothing
    out = attention(q, k, v, attn_mask=mask, backend="torch")
    ((k_shape, passed),) = seen
    assert k_shape == (2, 2, 5, 16)
    assert passed.dtype == torch.bool and passed.shape == (2, 1, 5, 5)
    ref = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    assert not out[0, :, :2].any()  # rows that see no key are zeros


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_torch_backend_one_dimensional_mask(kind):
    """A (Tk,) mask broadcasts like any other (SDPA itself takes 2+ dims)."""
    q = torch.randn(2, 4, 3, 16)
    k = v = torch.randn(2, 2, 5, 16)
    mask = torch.tensor([True, False, True, True, False])
    if kind == "additive":
        mask = torch.zeros(5).masked_fill(~mask, float("-inf"))
    out = attention(q, k, v, attn_mask=mask, backend="torch")
    ref = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_torch_backend_large_fp32_bias_on_half_inputs():
    """-1e9 from an fp32 mask stays finite in fp16 (clamped to fp16's lowest value): a row
    biased that way everywhere still attends (the constant cancels in the softmax), where a
    plain cast would make it all -inf and the row zeros."""
    q = torch.randn(1, 1, 2, 16, dtype=torch.float16)
    k = v = torch.randn(1, 1, 3, 16, dtype=torch.float16)
    bias = torch.zeros(2, 3)
    bias[0] = -1e9
    out = attention(q, k, v, attn_mask=bias, backend="torch")
    assert torch.isfinite(out).all() and out[0, 0, 0].abs().sum() > 0


def test_mask_that_broadcasts_with_but_not_to_the_scores_is_a_shape_error():
    q = torch.randn(1, 2, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ShapeError, match="does not broadcast"):
        attention(q, k, v, attn_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool), backend="torch")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_row_hidden_by_an_additive_mask_is_zeros_with_finite_gradients(backend):
    q = torch.randn(1, 2, 3, 16, requires_grad=True)
    k = torch.randn(1, 2, 4, 16, requires_grad=True)
    v = torch.randn(1, 2, 4, 16, requires_grad=True)
    bias = torch.randn(3, 4)
    bias[1] = float("-inf")  # query 1 sees nothing
    bias[2, :2] = float("-inf")
    out = attention(q, k, v, attn_mask=bias, backend=backend)
    assert not out[:, :, 1].any() and torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert not q.grad[:, :, 1].any()
    # The other rows: the bool mask of the -inf entries plus the finite bias.
    ref = attention_reference(
        q.detach().double(), k.detach().double(), v.detach().double(),
        attn_mask=bias.masked_fill(bias.isinf(), -1e30).double(),
    )  # fmt: skip
    keep = [0, 2]
    torch.testing.assert_close(out[:, :, keep].double(), ref[:, :, keep], atol=1e-5, rtol=1e-4)


def test_triton_refuses_sequences_past_int32_offsets():
    from turbolm.ops.attention import _int32_offset_overflow

    big = torch.empty(1, 600_000, 32, 128, device="meta")  # bshd: token stride 4096
    reason = _int32_offset_overflow(big, big, big, "bshd")
    assert reason and "q has 600000 tokens" in reason and "torch backend" in reason
    fits = torch.empty(1, 500_000, 32, 128, device="meta")
    assert _int32_offset_overflow(fits, fits, fits, "bshd") is None
    # the same tokens in bhsd have a token stride of 128: fine
    assert _int32_offset_overflow(*(big.transpose(1, 2).contiguous(),) * 3, "bhsd") is None


def test_autocast_casts_inputs_like_sdpa():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    v = torch.randn(2, 4, 9, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    ref = attention(q.bfloat16(), k.bfloat16(), v, causal=True)
    torch.testing.assert_close(out, ref)
    q64 = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp64 is left alone, as autocast does
        assert attention(q64, q64, q64).dtype == torch.float64
