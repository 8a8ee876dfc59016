"""TransformerLM and RNNLM: shapes, init, variants, backends, step(), accounting, configs."""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch

import turbolm
from turbolm.errors import ConfigError, DTypeError, InputError, ShapeError
from turbolm.models import (
    RNNLM,
    RNNConfig,
    TransformerConfig,
    TransformerLM,
    build_model,
    model_config_dict,
)

V = 61


@pytest.fixture(autouse=True)
def rnn_modules(monkeypatch):
    """Use torch.nn's recurrent modules only while turbolm.nn.rnn cannot be imported."""
    try:
        import turbolm.nn.rnn  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("turbolm.nn.rnn")
        stand_in.LSTM, stand_in.GRU, stand_in.RNN = torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN
        monkeypatch.setitem(sys.modules, "turbolm.nn.rnn", stand_in)


def tiny_transformer(**overrides) -> TransformerLM:
    fields = dict(vocab_size=V, context=16, n_layer=2, n_head=4, d_model=32)
    return TransformerLM(TransformerConfig(**{**fields, **overrides}))


def tiny_rnn(**overrides) -> RNNLM:
    fields = dict(vocab_size=V, n_layer=2, d_embed=32, d_hidden=32, context=16)
    return RNNLM(RNNConfig(**{**fields, **overrides}))


TRANSFORMER_VARIANTS = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    "learned_pos": dict(pos="learned", bias=True),
    "mqa_untied": dict(n_kv_head=1, tie_embeddings=False),
    "dropout": dict(dropout=0.1, mlp="swiglu", mlp_ratio=2.0),
}
RNN_VARIANTS = {
    "lstm": {},
    "gru": dict(cell="gru"),
    "rnn_tanh": dict(cell="rnn_tanh", n_layer=1),
    "rnn_relu_untied": dict(cell="rnn_relu", d_embed=24, tie_embeddings=False, dropout=0.1),
    "lstm_tied_projected": dict(d_embed=24, d_hidden=40),
}
ALL_MODELS = [(tiny_transformer, kw) for kw in TRANSFORMER_VARIANTS.values()]
ALL_MODELS += [(tiny_rnn, kw) for kw in RNN_VARIANTS.values()]
ALL_IDS = [f"transformer-{n}" for n in TRANSFORMER_VARIANTS] + [f"rnn-{n}" for n in RNN_VARIANTS]


def _batch(b=3, t=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (b, t), generator=gen)
    targets = torch.randint(0, V, (b, t), generator=gen)
    return idx, targets


# ---------------------------------------------------------------------------------------------
# shapes, init, gradients


@pytest.mark.parametrize("make,kw", ALL_MODELS, ids=ALL_IDS)
def test_forward_backward_shapes_and_initial_loss(make, kw):
    torch.manual_seed(0)
    model = make(**kw)
    idx, targets = _batch()
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V) and logits.dtype == torch.float32
    assert loss.shape == () and abs(loss.item() - math.log(V)) < 0.1
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, V) and loss is None


@pytest.mark.parametrize("make,kw", ALL_MODELS, ids=ALL_IDS)
def test_no_information_flows_from_the_future(make, kw):
    torch.manual_seed(0)
    model = make(**kw).eval()
    idx, _ = _batch(b=2)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_ignores_minus_100():
    model = tiny_transformer()
    idx, targets = _batch()
    targets[:, :8] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 8:].reshape(-1, V), targets[:, 8:].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("make", [tiny_transformer, tiny_rnn])
def test_tied_weights_are_shared(make):
    model = make()
    emb = model.tok_emb if isinstance(model, TransformerLM) else model.embed
    head = model.lm_head if isinstance(model, TransformerLM) else model.head
    assert head.weight is emb.weight
    with torch.no_grad():
        emb.weight[3].fill_(1.5)
    assert torch.equal(head.weight[3], torch.full((32,), 1.5))
    _, loss = model(*_batch())
    loss.backward()
    assert emb.weight.grad is head.weight.grad
    untied = make(tie_embeddings=False)
    assert (untied.lm_head if make is tiny_transformer else untied.head).weight is not (
        untied.tok_emb if make is tiny_transformer else untied.embed
    ).weight


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = tiny_transformer(n_layer=8, d_model=128, context=8)
    std = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_swiglu_hidden_size_is_rounded_to_64():
    config = TransformerConfig(vocab_size=V, d_model=96, n_head=4, mlp="swiglu")
    assert config.hidden_size == 256  # 2/3 * 4 * 96 = 256
    config = TransformerConfig(vocab_size=V, d_model=100, n_head=5, mlp="swiglu")
    assert config.hidden_size == 320  # 266 -> 320
    model = tiny_transformer(mlp="swiglu")
    assert model.blocks[0].mlp.fc.weight.shape == (2 * 128, 32)  # 85 -> 128, gate and up fused
    assert tiny_transformer().blocks[0].mlp.fc.weight.shape == (128, 32)


# ---------------------------------------------------------------------------------------------
# learning and backends


@pytest.mark.parametrize(
    "make,kw,lr",
    [
        (tiny_transformer, {}, 1e-2),
        (tiny_transformer, TRANSFORMER_VARIANTS["llama"], 1e-2),
        (tiny_rnn, {}, 3e-2),
        (tiny_rnn, RNN_VARIANTS["gru"], 3e-2),
    ],
    ids=["transformer", "llama", "lstm", "gru"],
)
def test_overfits_a_tiny_batch(make, kw, lr):
    """50 Adam steps on one batch of random targets: the loss falls far below ln(V)."""
    torch.manual_seed(0)
    model = make(**kw)
    idx, targets = _batch(b=2, t=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(50):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.4 * first, (first, loss.item())


@pytest.mark.parametrize("variant", ["gpt2", "llama", "learned_pos"])
def test_reference_and_torch_backends_agree(variant):
    torch.manual_seed(0)
    model = tiny_transformer(**TRANSFORMER_VARIANTS[variant]).eval()
    idx, _ = _batch()
    with turbolm.use_backend("reference"):
        ref, _ = model(idx)
    with turbolm.use_backend("torch"):
        got, _ = model(idx)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# step() == forward


@pytest.mark.parametrize("variant", list(TRANSFORMER_VARIANTS))
def test_transformer_step_equals_forward(variant):
    torch.manual_seed(0)
    model = tiny_transformer(**TRANSFORMER_VARIANTS[variant]).eval()
    idx, _ = _batch(b=2)
    full, _ = model(idx)
    state = model.init_state(2)
    with torch.no_grad():
        parts = [model.step(idx[:, :6], state)[0]]
        parts += [model.step(idx[:, t : t + 1], state)[0] for t in range(6, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="do not fit"):
        model.step(idx[:, :1], state)


@pytest.mark.parametrize("variant", list(RNN_VARIANTS))
def test_rnn_step_equals_forward(variant):
    torch.manual_seed(0)
    model = tiny_rnn(**RNN_VARIANTS[variant]).eval()
    idx, _ = _batch(b=2, t=40)  # longer than context: the RNN has no limit
    full, _ = model(idx)
    with torch.no_grad():
        logits, state = model.step(idx[:, :10], model.init_state(2))
        parts = [logits]
        for t in range(10, 40):
            logits, state = model.step(idx[:, t : t + 1], state)
            parts.append(logits)
        from_none, _ = model.step(idx, None)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_none, full)


def test_transformer_input_errors():
    model = tiny_transformer()
    with pytest.raises(InputError, match="context=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(DTypeError):
        model(torch.zeros(1, 4))
    with pytest.raises(ShapeError):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="targets"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="max_len"):
        model.init_state(1, max_len=17)
    with pytest.raises(InputError, match="state"):
        model.step(torch.zeros(1, 1, dtype=torch.long), [])


# ---------------------------------------------------------------------------------------------
# accounting


@pytest.mark.parametrize("make,kw", ALL_MODELS, ids=ALL_IDS)
def test_num_params_counts_unique_parameters(make, kw):
    model = make(**kw)
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert model.num_params() == sum(unique.values())
    groups = model.configure_optimizer_groups(0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(unique)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])


def test_transformer_num_params_and_flops_formula():
    c = TransformerConfig(vocab_size=V, context=16, n_layer=2, n_head=4, d_model=32, pos="learned")
    model = TransformerLM(c)
    d, h = 32, 128
    per_layer = 2 * d + (3 * d * d) + d * d + d * h + h * d  # 2 LayerNorms (no bias)
    expected = V * d + 16 * d + c.n_layer * per_layer + d  # + final norm
    assert model.num_params() == expected
    non_embedding = expected - 16 * d  # tied token embedding is the LM head: it counts
    assert model.num_params(exclude_embeddings=True) == non_embedding
    assert model.flops_per_token() == 6 * non_embedding + 12 * 2 * d * 16
    untied = tiny_transformer(tie_embeddings=False)
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - V * d


def test_rnn_tied_with_different_sizes_projects():
    model = tiny_rnn(d_embed=24, d_hidden=40)
    assert model.proj.weight.shape == (24, 40) and model.head.weight is model.embed.weight
    assert tiny_rnn(d_embed=24, d_hidden=40, tie_embeddings=False).proj is None
    assert tiny_rnn().proj is None
    flops = 6 * (4 * 40 * (24 + 40) + 4 * 40 * 80 + 40 * 24 + 24 * V)
    assert model.flops_per_token() == flops


def test_rnn_flops_formula():
    model = tiny_rnn(cell="gru", d_embed=24, d_hidden=32, tie_embeddings=False, n_layer=2)
    assert model.flops_per_token() == 6 * (3 * 32 * (24 + 32) + 3 * 32 * 64 + 32 * V)
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    assert model.flops_per_token() == 6 * (weights - V * 24)  # 6 x matmul weights
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * 24


# ---------------------------------------------------------------------------------------------
# configs and build_model


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(d_model=30, n_head=4), "d_model"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(d_model=12, n_head=4), "head dim"),  # head dim 3 with rope
        (dict(n_layer=0), "n_layer"),
        (dict(context=-1), "context"),
        (dict(vocab_size=1.5), "vocab_size"),
        (dict(mlp="relu"), "mlp"),
        (dict(norm="batchnorm"), "norm"),
        (dict(pos="alibi"), "pos"),
        (dict(dropout=1.0), "dropout"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(bias="yes"), "bias"),
    ],
)
def test_transformer_config_validation(fields, field):
    base = dict(vocab_size=V, d_model=32, n_head=4)
    with pytest.raises(ConfigError, match=field):
        TransformerConfig(**{**base, **fields})


def test_learned_positions_allow_odd_head_dim():
    assert TransformerConfig(vocab_size=V, d_model=12, n_head=4, pos="learned").head_dim == 3


@pytest.mark.parametrize(
    "fields,field",
    [
        (dict(cell="transformer"), "cell"),
        (dict(tie_embeddings=1), "tie_embeddings"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=-0.1), "dropout"),
        (dict(d_hidden=True), "d_hidden"),
    ],
)
def test_rnn_config_validation(fields, field):
    with pytest.raises(ConfigError, match=field):
        RNNConfig(**{**dict(vocab_size=V, d_embed=32, d_hidden=32), **fields})


@pytest.mark.parametrize("make,kw", ALL_MODELS, ids=ALL_IDS)
def test_build_model_round_trip(make, kw):
    model = make(**kw)
    cfg = model_config_dict(model)
    assert cfg["arch"] in ("transformer", "rnn")
    rebuilt = build_model(cfg)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    assert dataclasses.asdict(rebuilt.config) == {k: v for k, v in cfg.items() if k != "arch"}
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes


def test_build_model_errors():
    with pytest.raises(ConfigError, match="arch"):
        build_model({"vocab_size": V})
    with pytest.raises(ConfigError, match="arch"):
        build_model({"arch": "mamba", "vocab_size": V})
    with pytest.raises(ConfigError, match="d_hidden"):
        build_model({"arch": "transformer", "vocab_size": V, "d_hidden": 3})
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model({"arch": "rnn"})
    with pytest.raises(ConfigError, match="cell"):
        build_model({"arch": "rnn", "vocab_size": V, "cell": "lstmx"})
    assert isinstance(
        build_model({"arch": "rnn", "vocab_size": V, "d_embed": 8, "d_hidden": 8}), RNNLM
    )


def _loss_and_grads(model, idx, targets):
    torch.manual_seed(7)  # same dropout masks in both runs
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["gpt2", "llama", "dropout"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    torch.manual_seed(0)
    model = tiny_transformer(**TRANSFORMER_VARIANTS[variant]).train()
    idx = torch.randint(0, V, (3, 16))
    targets = torch.randint(0, V, (3, 16))
    loss, grads = _loss_and_grads(model, idx, targets)
    model.activation_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, idx, targets)
    # Recomputing repeats the same operations (and dropout masks): identical numbers.
    assert torch.equal(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)


def _saved_activation_bytes(model, idx, targets) -> int:
    """Bytes the autograd graph of one forward keeps for backward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    loss.backward()
    return total


def test_activation_checkpointing_keeps_only_block_inputs():
    torch.manual_seed(0)
    model = tiny_transformer(n_layer=4, d_model=64, context=64)
    idx, targets = torch.randint(0, V, (2, 64)), torch.randint(0, V, (2, 64))
    full = _saved_activation_bytes(model, idx, targets)
    model.activation_checkpointing = True
    kept = _saved_activation_bytes(model, idx, targets)
    # Without it each block keeps norms, q/k/v, attention output, MLP hidden (4x) ...;
    # with it, one (B, T, C) input per block plus the head and loss.
    assert kept < full / 3, (kept, full)
    with torch.no_grad():  # nothing to recompute: runs the blocks directly
        logits, _ = model(idx)
    model.activation_checkpointing = False
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "make,kw",
    [
        (tiny_transformer, TRANSFORMER_VARIANTS["gpt2"]),
        (tiny_transformer, TRANSFORMER_VARIANTS["mqa_untied"]),
        (tiny_rnn, RNN_VARIANTS["lstm_tied_projected"]),
        (tiny_rnn, RNN_VARIANTS["rnn_relu_untied"]),  # head bias, dropout
    ],
)
def test_fused_loss_matches_the_logits_path(backend, make, kw):
    torch.manual_seed(0)
    model = make(**kw).train()
    idx = torch.randint(0, V, (3, 16))
    targets = torch.randint(0, V, (3, 16))
    targets[0, :5] = -100
    loss, grads = _loss_and_grads(model, idx, targets)
    model.fused_loss = True
    with turbolm.use_backend({"linear_cross_entropy": backend}):
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        logits, fused = model(idx, targets)
        fused.backward()
    assert logits is None  # the (B, T, V) logits were never formed
    torch.testing.assert_close(fused, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)
    logits, none = model(idx)  # without targets: the logits as usual
    assert logits.shape == (3, 16, V) and none is None
