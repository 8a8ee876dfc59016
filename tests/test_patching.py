"""``turbolm.patching``: plain PyTorch models and ``transformers`` models patched in place.

Every patched model is compared with an unpatched deep copy: outputs, every parameter's
gradient, greedy generation; a spy on the op registry proves the patched modules really run
turbolm's ops (and through which backend); revert restores the original classes and
attention function.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # Triton on CPU tensors: the interpreter (before importing it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import turbolm  # noqa: E402
import turbolm.nn as tnn  # noqa: E402
from turbolm.errors import BackendError, InputError  # noqa: E402
from turbolm.ops import registry  # noqa: E402
from turbolm.ops.attention import visible_mask  # noqa: E402
from turbolm.patching import (  # noqa: E402
    FAMILIES,
    apply_turbolm,
    apply_turbolm_to_gpt2,
    apply_turbolm_to_llama,
    revert_turbolm,
)
from turbolm.patching import hf as hf_patching  # noqa: E402

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


@pytest.fixture
def op_calls(monkeypatch):
    """Every (op, backend) the registry selects while the test runs."""
    calls: list[tuple[str, str]] = []
    select = registry.select

    def spy(op, *args, **kwargs):
        chosen = select(op, *args, **kwargs)
        calls.append((op, chosen.name))
        return chosen

    monkeypatch.setattr(registry, "select", spy)
    return calls


@pytest.fixture
def attention_runs(monkeypatch):
    """How the patched transformers attention called the op: one entry per call, "mask",
    "varlen" or "plain"."""
    runs: list[str] = []
    real = hf_patching.attention

    def spy(*args, **kwargs):
        kind = "varlen" if "cu_seqlens" in kwargs else "plain"
        runs.append("mask" if kwargs.get("attn_mask") is not None else kind)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_patching, "attention", spy)
    return runs


def assert_grads_match(patched: torch.nn.Module, original: torch.nn.Module, atol=1e-5):
    named = dict(original.named_parameters())
    for name, param in patched.named_parameters():
        ref = named[name].grad
        if ref is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        assert param.grad is not None, f"{name}: no gradient after patching"
        torch.testing.assert_close(param.grad, ref, atol=atol, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------
# Plain PyTorch


class CustomNorm(torch.nn.LayerNorm):
    """A user subclass with its own forward: must be left alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


class PlainNet(torch.nn.Module):
    """Every torch.nn module kind turbolm has a twin of, plus one it must not touch."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(5, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.ln_plain = torch.nn.LayerNorm(8, elementwise_affine=False)
        self.rms = torch.nn.RMSNorm(8, eps=1e-6)
        self.lstm = torch.nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = torch.nn.GRU(12, 5, batch_first=True)
        self.rnn = torch.nn.RNN(5, 4, nonlinearity="relu", batch_first=True)
        self.lstm_cell = torch.nn.LSTMCell(4, 3)
        self.gru_cell = torch.nn.GRUCell(3, 3)
        self.rnn_cell = torch.nn.RNNCell(3, 2)
        self.custom = CustomNorm(2)

    def forward(self, x):  # x (B, T, 5)
        h = self.rms(self.ln_plain(self.ln(self.embed(x))))
        h, _ = self.lstm(h)
        h, _ = self.gru(h)
        h, _ = self.rnn(h)
        last = h[:, -1]
        hc, cc = self.lstm_cell(last)
        g = self.gru_cell(hc)
        return self.custom(self.rnn_cell(g))


PLAIN_SWAPPED = {
    "ln": tnn.LayerNorm,
    "ln_plain": tnn.LayerNorm,
    "rms": tnn.RMSNorm,
    "lstm": tnn.LSTM,
    "gru": tnn.GRU,
    "rnn": tnn.RNN,
    "lstm_cell": tnn.LSTMCell,
    "gru_cell": tnn.GRUCell,
    "rnn_cell": tnn.RNNCell,
}


def plain_pair(seed=0):
    torch.manual_seed(seed)
    model = PlainNet()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_plain_model_outputs_and_gradients_match(backend, op_calls):
    model, original = plain_pair()
    report = apply_turbolm(model)
    x = torch.randn(3, 7, 5)
    expected = original(x)
    expected.square().sum().backward()
    with turbolm.use_backend(backend):
        out = model(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert_grads_match(model, original)
    ops = {op for op, chosen in op_calls if chosen == backend}
    assert {"layer_norm", "rms_norm", "lstm", "gru", "rnn"} <= ops, op_calls
    assert {"lstm_cell", "gru_cell", "rnn_cell"} <= ops, op_calls
    assert report.count("norm") == 3 and report.count("rnn") == 6


def test_plain_model_classes_parameters_and_report():
    model, _ = plain_pair()
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = apply_turbolm(model)
    for name, cls in PLAIN_SWAPPED.items():
        assert type(getattr(model, name)) is cls, name
    assert type(model.custom) is CustomNorm
    assert [name for name, _ in report.skipped] == ["custom"]
    assert "CustomNorm" in report.skipped[0][1]
    # Same parameter objects, same state_dict keys: optimizer state and checkpoints carry over.
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before
    text = str(report)
    assert "norm 3, rnn 6" in text and "lstm_cell (LSTMCell)" in text


def test_plain_model_patch_is_idempotent_and_reverts():
    model, _ = plain_pair()
    first = apply_turbolm(model)
    second = apply_turbolm(model)
    assert first.count() == 9 and second.count() == 0
    assert revert_turbolm(model) == 9
    for name in PLAIN_SWAPPED:
        module = getattr(model, name)
        assert (
            type(module).__module__ == "torch.nn.modules." + type(module).__module__.split(".")[-1]
        )
        assert "_turbolm_original_class" not in module.__dict__
    assert revert_turbolm(model) == 0


def test_plain_model_kinds_can_be_turned_off():
    model, _ = plain_pair()
    report = apply_turbolm(model, rnn=False)
    assert report.count("rnn") == 0 and report.count("norm") == 3
    assert type(model.lstm) is torch.nn.LSTM and type(model.ln) is tnn.LayerNorm


def test_optimizer_created_before_patching_keeps_training():
    model, original = plain_pair()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(original.parameters(), lr=1e-2)
    x = torch.randn(2, 4, 5)
    for step in range(3):
        if step == 1:
            apply_turbolm(model)  # mid-training: the optimizer's parameters are the same objects
        for m, o in ((model, opt), (original, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_patched_model_deepcopies_and_pickles():
    model, _ = plain_pair()
    apply_turbolm(model)
    x = torch.randn(2, 4, 5)
    expected = model(x)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own bytes, written just above
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (clone, loaded, unpickled):
        assert type(other.lstm) is tnn.LSTM
        torch.testing.assert_close(other(x), expected)
        assert revert_turbolm(other) == 9


def test_plain_transformer_encoder_is_patched(op_calls):
    """torch.nn.TransformerEncoder: its MultiheadAttention and LayerNorms run turbolm's ops."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, dropout=0.0, batch_first=True
    )
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    original = copy.deepcopy(model)
    report = apply_turbolm(model)
    assert report.count("attention") == 2 and report.count("norm") == 4
    assert type(model.layers[0].self_attn) is tnn.MultiheadAttention
    x = torch.randn(3, 7, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
    out = model(x, mask=causal, is_causal=True)
    ref = original(x, mask=causal, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_grads_match(model, original)
    assert {"attention", "layer_norm"} <= {op for op, _ in op_calls}


def test_bad_arguments_are_typed_errors():
    with pytest.raises(InputError, match="torch.nn.Module"):
        apply_turbolm("model")
    with pytest.raises(InputError, match="norm must be True or False"):
        apply_turbolm(torch.nn.Linear(2, 2), norm="yes")
    with pytest.raises(InputError, match="torch.nn.Module"):
        revert_turbolm(None)
    with pytest.raises(InputError, match="expects a transformers 'llama' model"):
        apply_turbolm_to_llama(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# transformers models

# Tiny random models, built from configs (nothing is downloaded). head_dim 32: the smallest
# head dim the triton kernels take.
_COMMON = {
    "vocab_size": 97,
    "hidden_size": 128,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_hf_model(family: str, **overrides):
    """(model in eval mode, its config), randomly initialised under a fixed seed; the norms get
    random weights so a wrong RMSNorm formula cannot hide behind ones / zeros."""
    t = transformers
    builders = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {"sliding_window": 5}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {"head_dim": 32}),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM, {"head_dim": 32}),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {"head_dim": 32}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
    }
    torch.manual_seed(0)
    if family == "gpt2":
        config = t.GPT2Config(
            vocab_size=97, n_embd=128, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides,
        )  # fmt: skip
        model = t.GPT2LMHeadModel(config)
    else:
        config_cls, model_cls, extra = builders[family]
        config = config_cls(**{**_COMMON, **extra, **overrides})
        model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def ids_and_padding(batch=2, length=12, pad=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0  # left padding in the first row
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_family_logits_and_gradients_match(family, op_calls, attention_runs):
    model = tiny_hf_model(family)
    original = copy.deepcopy(model)
    report = apply_turbolm(model)
    assert report.count("norm") == 2 * 2 + 1 + (4 if family == "qwen3" else 0)
    assert report.count("attention") == 1 and report.attention_before == "sdpa"
    assert model.config._attn_implementation == "turbolm" and not report.skipped
    ids, mask = ids_and_padding()
    for padding in (None, mask):
        model.zero_grad()
        original.zero_grad()
        out = model(ids, attention_mask=padding, labels=ids)
        ref = original(ids, attention_mask=padding, labels=ids)
        keep = slice(None) if padding is None else padding.bool()
        torch.testing.assert_close(out.logits[keep], ref.logits[keep], atol=2e-5, rtol=1e-4)
        out.loss.backward()
        ref.loss.backward()
        assert_grads_match(model, original, atol=2e-5)
    norm_op = "layer_norm" if family == "gpt2" else "rms_norm"
    assert norm_op in {op for op, _ in op_calls}
    # Two layers, unpadded (no mask: causal; Mistral's window of 5 < 12 tokens needs one)
    # then padded (the mask, taken by auto's backend).
    unpadded = "mask" if family == "mistral" else "plain"
    assert attention_runs == [unpadded] * 2 + ["mask"] * 2


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [True, False])
def test_hf_greedy_generation_matches(family, cache, padded, op_calls):
    """Unpadded prompts give no mask at all: the causal rule alone (with a static cache, keys
    beyond the prompt exist during prefill and must not be seen)."""
    model = tiny_hf_model(family)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding(length=8, pad=3 if padded else 0)
    options = {"max_new_tokens": 6, "do_sample": False, "attention_mask": mask}
    if cache == "static":
        options["cache_implementation"] = "static"
    expected = original.generate(ids, **options)
    got = model.generate(ids, **options)
    assert torch.equal(got, expected)
    assert any(op == "attention" for op, _ in op_calls)


def test_hf_attention_uses_the_triton_kernels(op_calls):
    """The patched attention and RMSNorm on the triton backend (interpreter here): the kernels
    take transformers' (B, H, T, D) tensors, GQA and the causal rule."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids = torch.randint(3, 97, (2, 17), device=device)
    with turbolm.use_backend("attention=triton,rms_norm=triton"):
        out = model(ids, labels=ids)
        out.loss.backward()
    ref = original(ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-3)
    assert_grads_match(model, original, atol=1e-4)
    assert ("attention", "triton") in op_calls and ("rms_norm", "triton") in op_calls


def test_hf_dropout_reaches_the_op(monkeypatch):
    model = tiny_hf_model("llama", attention_dropout=0.25)
    apply_turbolm(model)
    seen = []
    real = hf_patching.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_patching, "attention", spy)
    ids, _ = ids_and_padding()
    model(ids)
    model.train()
    model(ids)
    assert seen == [0.0, 0.0, 0.25, 0.25]


def test_hf_revert_restores_classes_and_attention():
    model = tiny_hf_model("qwen3")
    before = {name: type(m) for name, m in model.named_modules()}
    apply_turbolm(model)
    norm = model.model.layers[0].input_layernorm
    assert isinstance(norm, transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm)
    assert type(norm).__name__ == "TurbolmQwen3RMSNorm"
    assert revert_turbolm(model) == 10
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert model.config._attn_implementation == "sdpa"


def test_hf_patched_checkpoint_loads_unpatched(tmp_path):
    model = tiny_hf_model("llama")
    apply_turbolm(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation != "turbolm"
    ids, mask = ids_and_padding()
    torch.testing.assert_close(
        loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
        atol=2e-5, rtol=1e-4,
    )  # fmt: skip


def test_hf_softcapped_attention_is_left_alone():
    model = tiny_hf_model("gemma2")
    report = apply_turbolm(model)
    assert report.count("attention") == 0 and report.count("norm") > 0
    assert report.skipped == [
        ("<attention>", "config.attn_logit_softcapping is set; turbolm attention has no logit "
         "soft-capping"),
    ]  # fmt: skip
    assert model.config._attn_implementation != "turbolm"


def test_hf_attention_refuses_unsupported_arguments():
    model = tiny_hf_model("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 32)
    k = v = torch.randn(1, 2, 3, 32)
    with pytest.raises(InputError, match="'softcap'"):
        hf_patching.turbolm_attention_forward(attn, q, k, v, None, softcap=30.0)
    with pytest.warns(UserWarning, match="no attention weights"):
        out, weights = hf_patching.turbolm_attention_forward(
            attn, q, k, v, None, output_attentions=True
        )
    assert out.shape == (1, 3, 4, 32) and weights is None


def test_hf_rmsnorm_mixed_dtype_takes_the_original_forward():
    model = tiny_hf_model("llama")
    apply_turbolm(model)
    norm = model.model.norm
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    base = type(norm).__mro__[1]
    torch.testing.assert_close(norm(x), base.forward(norm, x), atol=0, rtol=0)
    assert norm(x).dtype == torch.float32  # transformers' promotion, kept


def test_hf_rmsnorm_with_another_formula_is_skipped():
    class OddRMSNorm(torch.nn.Module):
        """Looks like an RMSNorm, computes something else."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * self.weight

    OddRMSNorm.__module__ = "transformers.models.fake.modeling_fake"
    model = tiny_hf_model("llama")
    model.model.norm = OddRMSNorm()
    report = apply_turbolm(model)
    assert report.skipped == [
        ("model.norm", "OddRMSNorm: its forward matches neither RMSNorm formula turbolm implements")
    ]
    assert type(model.model.norm) is OddRMSNorm


def test_hf_family_patcher_checks_the_family():
    model = tiny_hf_model("llama")
    with pytest.raises(InputError, match="expects a transformers 'gpt2' model.*got 'llama'"):
        apply_turbolm_to_gpt2(model)
    assert apply_turbolm_to_llama(model).count() == 6


def test_hf_patched_model_bf16_close_to_original():
    """16-bit: turbolm rounds once where transformers rounds twice; logits stay close."""
    model = tiny_hf_model("llama").to(torch.bfloat16)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, attention_mask=mask).logits.float()
        ref = original(ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    assert (out[keep] - ref[keep]).abs().max() < 0.05 * ref[keep].abs().max()


# ----------------------------------------------------------------------------------------------
# Masks on a backend that takes none (triton): padding and sliding windows become varlen / window


def triton_device() -> str:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU")
    return "cuda"


def padded_labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hf_left_padding_on_triton_runs_varlen(family, op_calls, attention_runs):
    """Left padding (and Mistral's window of 5 over 17 tokens) on the triton backend: the mask
    becomes a packed batch of the valid tokens; valid logits and every gradient match."""
    device = triton_device()
    model = tiny_hf_model(family, num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding(length=17, pad=4)
    ids, mask = ids.to(device), mask.to(device)
    labels = padded_labels(ids, mask)
    with turbolm.use_backend("attention=triton"):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    ref = original(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref.logits[keep], atol=1e-4, rtol=1e-3)
    assert_grads_match(model, original, atol=1e-4)
    assert ("attention", "triton") in op_calls and attention_runs == ["varlen"]


def test_hf_sliding_window_without_padding_on_triton():
    device = triton_device()
    model = tiny_hf_model("mistral", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids = torch.randint(3, 97, (2, 17), device=device)
    with turbolm.use_backend("attention=triton"):
        out = model(ids).logits
    torch.testing.assert_close(out, original(ids).logits, atol=1e-4, rtol=1e-3)


def test_hf_left_padded_generation_on_triton():
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding(length=6, pad=2)
    options = {"max_new_tokens": 4, "do_sample": False, "attention_mask": mask.to(device)}
    expected = original.generate(ids.to(device), **options)
    with turbolm.use_backend("attention=triton"):
        got = model.generate(ids.to(device), **options)
    assert torch.equal(got, expected)


def test_hf_right_padding_on_triton(attention_runs):
    """Right padding: the real tokens run packed and causal; the padded queries after them see
    the row's keys, as under SDPA, through a second, non-causal call; every logit matches."""
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding(length=9, pad=0)
    mask[0, -3:] = 0
    ids, mask = ids.to(device), mask.to(device)
    with turbolm.use_backend("attention=triton"):
        out = model(ids, attention_mask=mask, labels=padded_labels(ids, mask))
        out.loss.backward()
    ref = original(ids, attention_mask=mask, labels=padded_labels(ids, mask))
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-3)
    assert_grads_match(model, original, atol=1e-4)
    assert attention_runs == ["varlen", "varlen"]


def test_hf_packed_sequences_on_triton(attention_runs):
    """Sequences packed into one row (position_ids restarting at 0, the way padding-free
    collators feed transformers; transformers builds the block mask only without a cache):
    one varlen call, one sequence per document."""
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids = torch.randint(3, 97, (1, 16), device=device)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]], device=device)
    with turbolm.use_backend("attention=triton"):
        out = model(ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
    ref = original(ids, position_ids=positions, labels=ids, use_cache=False)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-3)
    assert_grads_match(model, original, atol=1e-4)
    assert attention_runs == ["varlen"]


def sdpa_style_mask(k_valid, q_len, window=None, causal=True):
    """The (B, 1, Tq, Tk) mask transformers' SDPA builder gives for key padding ``k_valid``
    (B, Tk), queries at the last Tq positions, causal, sliding window of ``window`` keys."""
    k_len = k_valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    allowed = (k_pos <= q_pos) if causal else torch.ones(q_len, k_len, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return (allowed[None] & k_valid[:, None, :].bool())[:, None]


def plan_for(mask, causal, left):
    """The plan for a mask shaped (B, 1, Tq, Tk) exactly as the attention call's."""
    b, _, q_len, k_len = mask.shape
    return hf_patching._mask_plan(mask, b, q_len, k_len, causal, left)


def rebuild_from_plan(plan, b, q_len, k_len):
    """The (B, Tq, Tk) keys each query sees when the plan's calls run with the op's own
    causal / window rule (rows no call writes see nothing)."""
    seen = torch.zeros(b * q_len, b * k_len, dtype=torch.bool)
    for call in plan["calls"]:
        cu_q, cu_k = (c.tolist() for c in call["cu_seqlens"])
        for s in range(len(cu_q) - 1):
            rows = call["q_index"][cu_q[s] : cu_q[s + 1]]
            cols = call["k_index"][cu_k[s] : cu_k[s + 1]]
            rule = visible_mask(len(rows), len(cols), call["causal"], call["window"], "cpu")
            if rule is None:
                rule = torch.ones(len(rows), len(cols), dtype=torch.bool)
            seen[rows[:, None], cols[None, :]] = rule
        lengths_q = [cu_q[i + 1] - cu_q[i] for i in range(len(cu_q) - 1)]
        lengths_k = [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
        assert call["max_seqlen"] == (max(lengths_q), max(lengths_k))
    return torch.stack(
        [seen[i * q_len : (i + 1) * q_len, i * k_len : (i + 1) * k_len] for i in range(b)]
    )


def packed_mask(doc_lengths, pad_left=0, pad_right=0, window=None):
    """SDPA's mask for one row of packed documents (causal within each) between paddings:
    padded queries on the left see nothing, on the right they see every real key."""
    total = pad_left + sum(doc_lengths) + pad_right
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = pad_left
    for n in doc_lengths:
        i = torch.arange(n)
        block = i[None, :] <= i[:, None]
        if window is not None:
            block &= i[None, :] > i[:, None] - window
        mask[start : start + n, start : start + n] = block
        start += n
    mask[start:, pad_left:start] = True
    return mask


@pytest.mark.parametrize("q_len", [1, 4, 9])
@pytest.mark.parametrize("window", [None, 3])
def test_mask_plan_reproduces_left_padding_exactly(q_len, window):
    """The plan's packed sequences, run with the op's own causal / window rule, see exactly
    the keys the mask allows."""
    k_valid = torch.ones(3, 9, dtype=torch.bool)
    k_valid[0, :2] = False
    k_valid[2, :8] = False
    mask = sdpa_style_mask(k_valid, q_len, window)
    left = -1 if window is None else window - 1
    plan = plan_for(mask, True, left)
    assert plan is not None and len(plan["calls"]) == 1
    assert torch.equal(rebuild_from_plan(plan, 3, q_len, 9), mask[:, 0])


@pytest.mark.parametrize(
    "rows",
    [
        [([4, 3, 5], 0, 0), ([12], 0, 0)],  # packed documents, no padding
        [([5], 0, 3), ([8], 0, 0), ([2, 2], 0, 4)],  # right padding (and packing)
        [([5], 3, 0), ([8], 0, 0)],  # left padding
        [([1, 1, 1], 0, 5), ([], 0, 8)],  # one-token documents; a row of padding only
    ],
)
def test_mask_plan_reproduces_packing_and_right_padding(rows):
    mask = torch.stack([packed_mask(docs, lp, rp) for docs, lp, rp in rows])[:, None]
    plan = plan_for(mask, True, -1)
    assert plan is not None
    b, _, t, _ = mask.shape
    rebuilt = rebuild_from_plan(plan, b, t, t)
    assert torch.equal(rebuilt, mask[:, 0])
    right_padded = any(rp for _, _, rp in rows)
    assert len(plan["calls"]) == (2 if right_padded else 1)


def test_mask_plan_packing_with_a_window():
    mask = packed_mask([6, 5], window=3)[None, None]
    plan = plan_for(mask, True, 2)
    assert torch.equal(rebuild_from_plan(plan, 1, 11, 11), mask[:, 0])
    assert plan["calls"][0]["cu_seqlens"][0].tolist() == [0, 6, 11]


def test_mask_plan_refuses_what_it_cannot_reproduce():
    k_valid = torch.ones(2, 8, dtype=torch.bool)
    k_valid[1, -2:] = False  # right padding with a window: padded queries' keys are windowed
    assert plan_for(sdpa_style_mask(k_valid, 8, window=3), True, 2) is None
    # A hole that is not padding: a query that does not see a key its neighbours see.
    holes = sdpa_style_mask(torch.ones(1, 6, dtype=torch.bool), 6).clone()
    holes[0, 0, 4, 2] = False
    assert plan_for(holes, True, -1) is None
    # First prefill of a static cache: 8 slots, 5 queries aligned top-left.
    static = torch.zeros(1, 1, 5, 8, dtype=torch.bool)
    static[0, 0, :, :5] = torch.ones(5, 5, dtype=torch.bool).tril()
    assert plan_for(static, True, -1) is None
    # Static-cache decode: one query at slot 5 of 8; the slot after it is unwritten.
    decode = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    decode[..., :6] = True
    assert plan_for(decode, True, -1) is None
    # Additive masks and per-head masks are left to backends that take masks.
    assert plan_for(torch.zeros(1, 1, 2, 2), True, -1) is None
    per_head = torch.ones(1, 2, 2, 2, dtype=torch.bool).tril()
    assert hf_patching._mask_plan(per_head, 1, 2, 2, True, -1) is None
    # A mask of batch 1 broadcast over a batch of 3, or of another key length, is not planned.
    causal = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert hf_patching._mask_plan(causal, 1, 4, 4, True, -1) == {}
    assert hf_patching._mask_plan(causal, 3, 4, 4, True, -1) is None
    assert hf_patching._mask_plan(causal, 1, 4, 5, True, -1) is None


# ----------------------------------------------------------------------------------------------
# What a review found: mixed instances of one RMSNorm class, broadcast masks, inference mode,
# unsupported attention features, wrappers, classes switched again, partial reverts


class SometimesScaledRMSNorm(torch.nn.Module):
    """Like Gemma3n's RMSNorm: instances with and without a weight."""

    def __init__(self, dim, with_scale=True):
        super().__init__()
        self.eps = 1e-6
        self.with_scale = with_scale
        if with_scale:
            self.weight = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float() if self.with_scale else out).type_as(x)


SometimesScaledRMSNorm.__module__ = "transformers.models.fake.modeling_fake"


@pytest.mark.parametrize("scaled_first", [True, False])
def test_hf_rmsnorm_instances_without_weight_are_left_alone(scaled_first):
    model = tiny_hf_model("llama", num_hidden_layers=1)
    first, second = (True, False) if scaled_first else (False, True)
    model.model.layers[0].input_layernorm = SometimesScaledRMSNorm(128, with_scale=first)
    model.model.norm = SometimesScaledRMSNorm(128, with_scale=second)
    original = copy.deepcopy(model)
    report = apply_turbolm(model)
    unscaled = "model.norm" if scaled_first else "model.layers.0.input_layernorm"
    assert report.skipped == [(unscaled, "SometimesScaledRMSNorm: no 1-D weight parameter")]
    assert report.count("norm") == 2  # the scaled one and post_attention_layernorm
    ids, mask = ids_and_padding()
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[mask.bool()],
        original(ids, attention_mask=mask).logits[mask.bool()],
        atol=2e-5, rtol=1e-4,
    )  # fmt: skip


def test_hf_broadcast_mask_is_not_planned():
    """A user's (1, 1, T, T) mask over a batch of 2: auto's backend broadcasts it; triton
    refuses it (a plan built from row 0 would give the other rows zeros)."""
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids = torch.randint(3, 97, (2, 8), device=device)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=device).tril()
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits, original(ids, attention_mask=mask).logits,
        atol=2e-5, rtol=1e-4,
    )  # fmt: skip
    with turbolm.use_backend("attention=triton"), pytest.raises(BackendError, match="attn_mask"):
        model(ids, attention_mask=mask)


def test_hf_left_padding_on_triton_under_inference_mode(attention_runs):
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding(length=9)
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode(), turbolm.use_backend("attention=triton"):
        out = model(ids, attention_mask=mask).logits
    ref = original(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-3)
    assert attention_runs == ["varlen"]


def test_hf_attention_features_turbolm_lacks_are_refused_at_patch_time():
    sinks = tiny_hf_model("llama", num_hidden_layers=1)
    sinks.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    report = apply_turbolm(sinks)
    assert report.count("attention") == 0
    assert report.skipped == [
        ("<attention>", "model.layers.0.self_attn has attention sinks (sinks), which turbolm lacks")
    ]
    assert sinks.config._attn_implementation == "sdpa"

    mla = tiny_hf_model("llama", num_hidden_layers=1)
    mla.config.qk_head_dim, mla.config.v_head_dim = 48, 32
    assert "differs from value head dim 32" in apply_turbolm(mla).skipped[0][1]

    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=97,
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
        )  # fmt: skip
    )
    (name, reason), *_ = apply_turbolm(t5).skipped
    assert name == "<attention>" and "relative position bias" in reason


def test_hf_model_inside_a_wrapper_is_patched(attention_runs):
    """A peft PeftModel (or any module holding a transformers model) gets the transformers
    patches too; revert finds them."""
    peft = pytest.importorskip("peft")
    model = tiny_hf_model("llama", num_hidden_layers=1)
    original = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    wrapped = peft.get_peft_model(model, config)
    report = apply_turbolm(wrapped)
    assert report.count("norm") == 3 and report.count("attention") == 1
    assert report.patched["attention"][0][0] == "base_model.model.<attention>"
    ids, mask = ids_and_padding()
    torch.testing.assert_close(
        wrapped(input_ids=ids, attention_mask=mask).logits[mask.bool()],
        original(ids, attention_mask=mask).logits[mask.bool()],
        atol=2e-5, rtol=1e-4,
    )  # fmt: skip
    assert attention_runs == ["mask"]
    assert revert_turbolm(wrapped) == 4
    assert model.config._attn_implementation == "sdpa"


def test_revert_leaves_a_class_switched_again_alone():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model, _ = plain_pair()
    apply_turbolm(model)
    parametrize.register_parametrization(model.ln, "weight", Double())
    with pytest.warns(UserWarning, match="class was changed again"):
        restored = revert_turbolm(model)
    assert restored == 8
    assert parametrize.is_parametrized(model.ln)
    model(torch.randn(2, 3, 5))  # still works, still patched underneath


def test_revert_of_the_whole_model_undoes_a_sub_model_patch():
    model = tiny_hf_model("llama", num_hidden_layers=1)
    apply_turbolm(model.model)
    assert model.config._attn_implementation == "turbolm"
    assert revert_turbolm(model) == 4
    assert model.config._attn_implementation == "sdpa"


def test_hf_all_padding_batch_on_triton():
    """No query sees any key: zeros from the attention, as on the other backends."""
    device = triton_device()
    model = tiny_hf_model("llama", num_hidden_layers=1).to(device)
    apply_turbolm(model)
    ids = torch.randint(3, 97, (2, 5), device=device)
    empty = torch.zeros(2, 5, dtype=torch.long, device=device)
    expected = model(ids, attention_mask=empty).logits
    with turbolm.use_backend("attention=triton"):
        got = model(ids, attention_mask=empty).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mask_plan_cache_follows_the_mask_not_its_copies():
    k_valid = torch.ones(2, 6, dtype=torch.bool)
    k_valid[0, :2] = False
    mask = sdpa_style_mask(k_valid, 6)
    first = hf_patching._cached_mask_plan(mask, 2, 6, 6, True, -1)
    assert hf_patching._cached_mask_plan(mask, 2, 6, 6, True, -1) is first
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        other = copy_of(mask)
        other[1, 0, 3, :] = False  # a hole: no plan; a stale one would be wrong
        assert hf_patching._cached_mask_plan(other, 2, 6, 6, True, -1) is None
    mask[1, 0, 3, :] = False  # in place on the original: seen through its version counter
    assert hf_patching._cached_mask_plan(mask, 2, 6, 6, True, -1) is None


def test_patched_hf_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole patched transformers model: a new interpreter rebuilds the
    patched RMSNorm classes (made at patch time) and gives the same logits."""
    import subprocess
    import sys

    model = tiny_hf_model("gemma", num_hidden_layers=1)
    apply_turbolm(model)
    ids, mask = ids_and_padding()
    torch.save({"model": model, "ids": ids, "mask": mask}, tmp_path / "m.pt")
    torch.save(model(ids, attention_mask=mask).logits, tmp_path / "logits.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"  # our own file, just written
        "model = saved['model']\n"
        "assert type(model.model.norm).__name__ == 'TurbolmGemmaRMSNorm', type(model.model.norm)\n"
        "logits = model(saved['ids'], attention_mask=saved['mask']).logits\n"
        "torch.testing.assert_close(logits, torch.load(sys.argv[2]), atol=1e-6, rtol=1e-5)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "m.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, cwd=root, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# fused linear cross-entropy (apply_turbolm(model, loss=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_fused_loss_matches_and_skips_the_logits(family, op_calls):
    model = tiny_hf_model(family)  # eval mode: no dropout, gradients still on
    original = copy.deepcopy(model)
    report = apply_turbolm(model, loss=True)
    assert report.count("loss") == 1 and not report.skipped, str(report)
    ids, mask = ids_and_padding()
    labels = ids.masked_fill(mask == 0, -100)
    n_items = (labels[:, 1:] != -100).sum() * 2  # as the Trainer passes for 2 micro-batches
    for extra in ({}, {"num_items_in_batch": n_items}):
        model.zero_grad()
        original.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, **extra)
        ref = original(ids, attention_mask=mask, labels=labels, **extra)
        assert out.logits is None  # never formed
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        out.loss.backward()
        ref.loss.backward()
        assert_grads_match(model, original, atol=2e-5)
    assert "linear_cross_entropy" in {op for op, _ in op_calls}
    with torch.no_grad():  # evaluation: the model's own forward, logits included
        out = model(ids, attention_mask=mask, labels=labels)
        ref = original(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_hf_fused_loss_shift_labels_positional_args_and_generation():
    model = tiny_hf_model("llama")
    original = copy.deepcopy(model)
    apply_turbolm(model, loss=True, norm=False, attention=False)
    ids, _ = ids_and_padding()
    shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].contiguous()
    out = model(ids, None, None, labels=None, shift_labels=shifted)  # no labels: unfused
    assert out.logits is not None and out.loss is None
    fused = model(ids, labels=ids, shift_labels=shifted)
    ref = original(ids, labels=ids, shift_labels=shifted)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, ref.loss, atol=1e-5, rtol=1e-5)
    tuple_out = model(ids, labels=ids, return_dict=False)  # tuples: the original forward
    torch.testing.assert_close(tuple_out[0], ref.loss, atol=1e-5, rtol=1e-5)
    generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    expected = original.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


def test_hf_fused_loss_reverts_copies_and_pickles():
    model = tiny_hf_model("qwen2")
    before = {name: type(m) for name, m in model.named_modules()}
    apply_turbolm(model, loss=True)
    assert type(model.lm_head).__name__ == "DeferredLMHead"
    ids, _ = ids_and_padding()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone(ids, labels=ids).logits is None  # still patched, on its own head
        assert clone.forward.model is clone
    assert apply_turbolm(model, loss=True).count("loss") == 0  # idempotent
    revert_turbolm(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert "forward" not in model.__dict__
    assert model(ids, labels=ids).logits is not None


def test_hf_fused_loss_skips_what_it_cannot_fuse():
    softcapped = tiny_hf_model("gemma2")  # final_logit_softcapping between lm_head and loss
    report = apply_turbolm(softcapped, loss=True)
    assert report.count("loss") == 0
    assert any("fused loss" in reason for _, reason in report.skipped)
    assert "forward" not in softcapped.__dict__
    peft = pytest.importorskip("peft")
    model = tiny_hf_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    report = apply_turbolm(wrapped, loss=True)
    assert report.count("loss") == 0
    assert any("not a plain nn.Linear" in reason for _, reason in report.skipped)


def test_hf_fused_loss_under_the_transformers_trainer(tmp_path):
    """transformers' Trainer (gradient accumulation: it passes num_items_in_batch) trains a
    patched model with the same per-step losses and final weights as the unpatched one."""
    pytest.importorskip("accelerate")
    gen = torch.Generator().manual_seed(3)
    rows = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(3, 97, (16, 10), generator=gen)
    ]
    rows[1]["labels"] = rows[1]["labels"].clone()
    rows[1]["labels"][:4] = -100  # uneven label counts: the normalisation matters
    results = {}
    for fused in (False, True):
        model = tiny_hf_model("llama").train()
        if fused:
            assert apply_turbolm(model, loss=True, norm=False, attention=False).count("loss")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        results[fused] = (losses, model.lm_head.weight.detach().clone())
    assert len(results[True][0]) == 3
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=1e-5)


def test_hf_fused_loss_output_holds_no_hidden_states():
    """out[0] is the loss and no entry holds the hidden states (setting a ModelOutput field
    to None keeps its dict entry: out[0], out["logits"] and to_tuple() were the hidden states,
    and accelerate's fp32 conversion rebuilt logits from them)."""
    model = tiny_hf_model("llama")
    original = copy.deepcopy(model)
    apply_turbolm(model, loss=True, norm=False, attention=False)
    ids, _ = ids_and_padding()
    out = model(ids, labels=ids)
    ref = original(ids, labels=ids)
    assert "logits" not in out and out.logits is None
    assert list(out.keys()) == [key for key in ref.keys() if key != "logits"]
    torch.testing.assert_close(out[0], ref.loss, atol=1e-5, rtol=1e-5)
    assert len(out.to_tuple()) == len(ref.to_tuple()) - 1
    accelerate_utils = pytest.importorskip("accelerate.utils")
    assert accelerate_utils.convert_to_fp32(out).logits is None


def test_hf_fused_loss_logits_to_keep_tensor_runs_unfused():
    model = tiny_hf_model("llama")
    original = copy.deepcopy(model)
    apply_turbolm(model, loss=True, norm=False, attention=False)
    ids, _ = ids_and_padding()
    keep = torch.arange(ids.shape[1])  # an index tensor: was `tensor in (None, 0)`, an error
    out = model(ids, labels=ids, logits_to_keep=keep)
    ref = original(ids, labels=ids, logits_to_keep=keep)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_hf_fused_loss_under_accelerate_mixed_precision_unwrap_and_revert():
    """accelerate's mixed precision wraps model.forward (autocast + fp32 outputs), as the
    Trainer's bf16=True does; unwrap_model(keep_fp32_wrapper=False) rebinds the forward it
    unwrapped with types.MethodType (was: the model became input_ids), and revert_turbolm under
    the wrapper left a fused forward with a plain head (was: ShapeError on logits)."""
    accelerate_utils = pytest.importorskip("accelerate.utils")
    model = tiny_hf_model("llama")
    original = copy.deepcopy(model)
    apply_turbolm(model, loss=True, norm=False, attention=False)
    ids, _ = ids_and_padding()
    ref = original(ids, labels=ids).loss
    model._original_forward = model.forward  # what Accelerator.prepare_model does
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    model.forward = accelerate_utils.convert_outputs_to_fp32(autocast(model.forward))
    out = model(ids, labels=ids)
    assert out.logits is None and "logits" not in out
    torch.testing.assert_close(out.loss, ref, atol=3e-2, rtol=1e-2)
    assert apply_turbolm(model, loss=True, attention=False).count("loss") == 0  # still patched
    assert revert_turbolm(model) >= 1
    assert type(model.lm_head) is torch.nn.Linear
    out = model(ids, labels=ids)  # the wrapper stays and calls the class's forward
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref, atol=3e-2, rtol=1e-2)
    assert apply_turbolm(model, loss=True, attention=False).count("loss") == 1  # patched again
    assert model(ids, labels=ids).logits is None
    model = accelerate_utils.extract_model_from_parallel(model, keep_fp32_wrapper=False)
    out = model(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert revert_turbolm(model) >= 1 and "forward" not in model.__dict__


def test_hf_fused_loss_data_parallel_replica_runs_itself():
    """nn.DataParallel's replicas share the model's __dict__ (shallow copy): each replica's
    forward must run that replica (its head, its parameters), not the original model."""
    model = tiny_hf_model("llama")
    original = copy.deepcopy(model)
    apply_turbolm(model, loss=True, norm=False, attention=False)
    replica = model._replicate_for_data_parallel()
    replica._modules = dict(replica._modules)
    replica.lm_head = copy.deepcopy(model.lm_head)  # as replicate() gives it its own modules
    original.lm_head = copy.deepcopy(original.lm_head)
    with torch.no_grad():
        replica.lm_head.weight.mul_(2)
        original.lm_head.weight.mul_(2)
    ids, _ = ids_and_padding()
    out = replica(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, original(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
    revert_turbolm(model)
    assert "_replicate_for_data_parallel" not in model.__dict__


def test_hf_patched_attention_under_autocast():
    """transformers' rotary step returns fp32 q / k next to a bf16 v under autocast; the op casts
    them to the autocast dtype as autocast does for SDPA (it raised a DTypeError)."""
    model = tiny_hf_model("llama").train()
    original = copy.deepcopy(model)
    apply_turbolm(model)
    ids, mask = ids_and_padding()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids)
        ref = original(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=3e-2, rtol=3e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
