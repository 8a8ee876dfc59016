"""turbolm.nn.attention: rotary embeddings, KV cache, CausalSelfAttention."""

from __future__ import annotations

import pytest
import torch

from turbolm import use_backend
from turbolm.errors import DTypeError, InputError, ShapeError
from turbolm.nn.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from turbolm.ops.attention import attention


def _rotate_at(rope: RotaryEmbedding, x: torch.Tensor, pos: int) -> torch.Tensor:
    return rope(x.view(1, 1, 1, -1), offset=pos).view(-1)


def test_rotary_relative_position_invariance():
    """q·k after rotation depends only on the distance between the positions."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, theta=10000.0, max_seq_len=8)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    for m, n in [(3, 1), (0, 5), (7, 7)]:
        base = _rotate_at(rope, q, m) @ _rotate_at(rope, k, n)
        for shift in (1, 10, 100):  # past max_seq_len: the tables grow
            shifted = _rotate_at(rope, q, m + shift) @ _rotate_at(rope, k, n + shift)
            torch.testing.assert_close(shifted, base, rtol=1e-6, atol=1e-6)
    assert rope.cos.shape[0] >= 107
    assert rope.cos.dtype == torch.float32


def test_rotary_properties():
    rope = RotaryEmbedding(8, max_seq_len=32)
    x = torch.randn(2, 3, 5, 8)
    y = rope(x)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    # an offset equals slicing a longer sequence
    long = rope(torch.cat([torch.randn(2, 3, 4, 8), x], dim=2))
    torch.testing.assert_close(rope(x, offset=4), long[:, :, 4:])
    assert rope(x.bfloat16()).dtype == torch.bfloat16
    assert "cos" not in rope.state_dict()  # non-persistent
    with pytest.raises(InputError):
        RotaryEmbedding(7)
    with pytest.raises(ShapeError):
        rope(torch.randn(1, 1, 2, 6))


def test_rotary_survives_half_precision_cast():
    rope = RotaryEmbedding(8, max_seq_len=16).to(torch.bfloat16)
    x = torch.randn(1, 1, 4, 8)
    torch.testing.assert_close(rope(x, offset=9), RotaryEmbedding(8)(x, offset=9))
    assert rope.cos.dtype == torch.float32


def test_kv_cache_append_and_overflow():
    cache = KVCache(batch_size=2, n_kv_head=1, max_len=5, head_dim=4)
    k, v = cache.append(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    assert k.shape == (2, 1, 3, 4) and cache.length == 3 and cache.remaining == 2
    k, v = cache.append(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    assert k.shape == (2, 1, 5, 4) and cache.k.shape == (2, 1, 5, 4)
    with pytest.raises(InputError, match="max_len=5"):
        cache.append(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    cache.reset()
    with pytest.raises(ShapeError):
        cache.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))
    with pytest.raises(DTypeError):
        cache.append(torch.randn(2, 1, 1, 4).double(), torch.randn(2, 1, 1, 4).double())
    with pytest.raises(InputError):
        KVCache(0, 1, 5, 4)


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decode_equals_full_forward(rope, n_kv_head):
    torch.manual_seed(0)
    attn = CausalSelfAttention(64, 4, n_kv_head, bias=True, rope=rope, max_seq_len=32).eval()
    x = torch.randn(3, 20, 64)
    full = attn(x)
    cache = attn.new_cache(batch_size=3, max_len=32)
    with torch.no_grad():
        parts = [attn(x[:, :7], cache)]  # prefill
        parts += [attn(x[:, t : t + 1], cache) for t in range(7, 17)]  # one token at a time
        parts.append(attn(x[:, 17:], cache))  # a few at once
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 20


def _expand_kv_heads(gqa: CausalSelfAttention) -> CausalSelfAttention:
    """An MHA module computing the same function as ``gqa`` (k/v heads repeated)."""
    nh, nkv, hs = gqa.n_head, gqa.n_kv_head, gqa.head_dim
    mha = CausalSelfAttention(gqa.d_model, nh, nh, bias=True, rope=gqa.rotary is not None)
    wq, wk, wv = gqa.qkv.weight.split([nh * hs, nkv * hs, nkv * hs])
    bq, bk, bv = gqa.qkv.bias.split([nh * hs, nkv * hs, nkv * hs])

    def repeat(w):
        return w.view(nkv, hs, *w.shape[1:]).repeat_interleave(nh // nkv, dim=0).flatten(0, 1)

    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.qkv.bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    return mha


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head):
    torch.manual_seed(0)
    gqa = CausalSelfAttention(32, 4, n_kv_head, bias=True)
    assert gqa.qkv.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)
    mha = _expand_kv_heads(gqa)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)


def test_matches_explicit_attention():
    """Without rope: the module is qkv -> causal attention -> proj."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, rope=False)
    x = torch.randn(1, 5, 16)
    q, k, v = attn.qkv(x).view(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    y = attention(q, k, v, causal=True, backend="reference").transpose(1, 2).reshape(1, 5, 16)
    torch.testing.assert_close(attn(x), attn.proj(y))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 6, 32)
    assert not torch.equal(attn(x), attn(x))
    attn.eval()
    assert torch.equal(attn(x), attn(x))


def test_backends_agree_and_gradients_flow():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 2)
    x = torch.randn(2, 11, 32, requires_grad=True)
    with torch.no_grad(), use_backend("reference"):
        ref = attn(x)
    out = attn(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and attn.qkv.weight.grad is not None


def test_constructor_and_input_errors():
    with pytest.raises(InputError, match="n_head"):
        CausalSelfAttention(30, 4)
    with pytest.raises(InputError, match="n_kv_head"):
        CausalSelfAttention(32, 4, 3)
    with pytest.raises(InputError, match="dropout"):
        CausalSelfAttention(32, 4, dropout=1.0)
    with pytest.raises(InputError, match="even"):
        CausalSelfAttention(12, 4)  # head dim 3 with rope
    attn = CausalSelfAttention(32, 4)
    with pytest.raises(ShapeError, match="d_model=32"):
        attn(torch.randn(2, 3, 16))
