"""Backend selection: argument > use_backend context > TURBOLM_BACKEND > auto; no silent fallback."""

import pytest
import torch

from turbolm.errors import BackendError
from turbolm.ops import registry, use_backend


@pytest.fixture
def toy_op():
    calls = []
    registry.register("toy", "reference", fn=lambda x: calls.append("reference") or x)
    registry.register("toy", "torch", fn=lambda x: calls.append("torch") or x)
    registry.register(
        "toy",
        "cpu",
        fwd=lambda x: (x, None),
        bwd=lambda g, _: (g,),
        available=lambda: "extension not built (test)",
    )
    yield calls
    registry._REGISTRY.pop("toy")


def _pick(explicit=None):
    return registry.select("toy", "cpu", explicit).name


def test_auto_skips_unavailable_backends(toy_op):
    assert _pick() == "torch"


def test_precedence(toy_op, monkeypatch):
    monkeypatch.setenv("TURBOLM_BACKEND", "reference")
    assert _pick() == "reference"
    with use_backend("torch"):
        assert _pick() == "torch"
        assert _pick("reference") == "reference"
        with use_backend({"toy": "reference"}):
            assert _pick() == "reference"
        assert _pick() == "torch"
    monkeypatch.setenv("TURBOLM_BACKEND", "other=reference,toy=torch")
    assert _pick() == "torch"


def test_named_backend_never_falls_back(toy_op):
    with pytest.raises(BackendError, match="extension not built"):
        _pick("cpu")
    with pytest.raises(BackendError, match="not available"):
        _pick("triton")
    with pytest.raises(BackendError, match="unknown backend"):
        with use_backend("fastest"):
            pass


def test_bad_env_value_is_a_clear_error(toy_op, monkeypatch):
    monkeypatch.setenv("TURBOLM_BACKEND", "cuda-ish")
    with pytest.raises(BackendError, match="TURBOLM_BACKEND"):
        _pick()


def test_kernel_backend_runs_through_the_shared_function(toy_op):
    from turbolm.ops.function import KernelFunction

    def fwd(x, scale):
        return x * scale, x

    def bwd(grad, x, scale):
        return (grad * scale,)

    backend = registry.Backend("toy2", "cpu", fwd=fwd, bwd=bwd)
    x = torch.randn(4, requires_grad=True)
    y = KernelFunction.apply(backend, {"scale": 3.0}, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 3.0))


def test_run_backend_skips_autograd_when_nothing_needs_gradients():
    """Inference calls the kernel's fwd directly (no autograd.Function overhead); with an input
    that needs a gradient the shared Function runs and its backward is the kernel's bwd."""
    from turbolm.ops.function import run_backend

    def fwd(x, scale):
        return x * scale, x

    def bwd(grad, x, scale):
        return (grad * scale,)

    backend = registry.Backend("toy2", "cpu", fwd=fwd, bwd=bwd)
    x = torch.randn(4)
    assert run_backend(backend, (x,), {"scale": 2.0}).grad_fn is None
    x.requires_grad_(True)
    with torch.no_grad():
        assert run_backend(backend, (x,), {"scale": 2.0}).grad_fn is None
    y = run_backend(backend, (x,), {"scale": 2.0})
    assert type(y.grad_fn).__name__ == "KernelFunctionBackward"
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 2.0))


@pytest.fixture
def counted_op():
    """Op "toy3": a cpu kernel backend whose supports() accepts x == "ok" (calls recorded)."""
    calls = []

    def supports(x=None, auto=False, **_):
        calls.append(auto)
        return None if x == "ok" else "x is not ok"

    registry.register("toy3", "reference", fn=lambda x: x)
    registry.register(
        "toy3", "cpu", fwd=lambda x: (x, None), bwd=lambda g, _: (g,), supports=supports
    )
    yield calls
    registry._REGISTRY.pop("toy3")
    registry.clear_selection_cache()


def _pick3(explicit=None, key="k", x="ok"):
    if key is None:
        return registry.select("toy3", "cpu", explicit, x=x).name
    return registry.select("toy3", "cpu", explicit, cache_key=key, x=x).name


def test_selection_cache_keeps_successes_only(counted_op):
    calls = counted_op
    assert [_pick3() for _ in range(3)] == ["cpu"] * 3  # auto: asked once, then cached
    assert calls == [True]
    assert [_pick3("cpu") for _ in range(3)] == ["cpu"] * 3  # by name: its own slot
    assert calls == [True, False]
    for _ in range(2):  # a failure is never cached: asked again, raised again
        with pytest.raises(BackendError, match="x is not ok"):
            _pick3("cpu", key="bad", x="bad")
    assert calls == [True, False, False, False]
    assert [_pick3(key="bad", x="bad") for _ in range(2)] == ["reference"] * 2  # auto falls on
    assert calls == [True, False, False, False, True]
    assert [_pick3(key=None) for _ in range(2)] == ["cpu"] * 2  # no key: nothing cached
    assert calls[-2:] == [True, True]


def test_selection_cache_follows_the_registry_and_the_request(counted_op, monkeypatch):
    assert _pick3() == "cpu"
    # Registering (here: replacing cpu) clears the cache.
    registry.register(
        "toy3", "cpu", fwd=lambda x: (x, None), bwd=lambda g, _: (g,), supports=lambda **_: "gone"
    )
    assert _pick3() == "reference"
    with pytest.raises(BackendError, match="gone"):
        _pick3("cpu")
    # A table swapped in without register() (tests do this) is noticed too.
    table = dict(registry._REGISTRY["toy3"])
    table["cpu"] = registry.Backend("toy3", "cpu", fwd=lambda x: (x, None), bwd=lambda g, _: (g,))
    monkeypatch.setitem(registry._REGISTRY, "toy3", table)
    assert _pick3() == "cpu"
    monkeypatch.undo()
    assert _pick3() == "reference"
    # The requested name is part of the slot: the environment variable is read on every call.
    monkeypatch.setenv("TURBOLM_BACKEND", "toy3=reference")
    assert _pick3() == "reference"
    monkeypatch.setenv("TURBOLM_BACKEND", "toy3=cpu")
    with pytest.raises(BackendError, match="TURBOLM_BACKEND"):
        _pick3()
    monkeypatch.setenv("TURBOLM_BACKEND", "toy3=fastest")
    for _ in range(2):  # an invalid value raises on every call
        with pytest.raises(BackendError, match="unknown backend 'fastest'"):
            _pick3()


def test_importing_turbolm_leaves_dynamo_and_triton_language_unimported():
    """``import turbolm`` (ops, models, patching) must not import torch._dynamo: it imports
    triton.language, after which TRITON_INTERPRET=1 set later no longer takes effect (the
    interpreter tests then fail with "Cannot call @triton.jit'd outside of the scope of a
    kernel"); it also costs about a second."""
    import subprocess
    import sys

    code = (
        "import sys, turbolm, turbolm.ops, turbolm.nn, turbolm.models, turbolm.patching\n"
        "bad = [m for m in ('torch._dynamo', 'triton.language') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("spec", [None, 3, ["torch"]])
def test_use_backend_with_a_wrong_type_is_a_backend_error(spec):
    with pytest.raises(BackendError, match="spec must be"):
        with use_backend(spec):
            pass


def test_torch_func_transforms_use_autograd_native_backends():
    """vmap / grad cannot go through the kernel backends' autograd.Function: auto takes an
    autograd-native backend there, and a kernel backend named explicitly is refused clearly."""
    from turbolm.ops import layer_norm, rms_norm

    torch.manual_seed(0)
    x, w = torch.randn(3, 8), torch.randn(8)
    with use_backend("cpu"):  # an outer choice of a kernel backend ...
        with use_backend("layer_norm=auto,rms_norm=auto"):  # ... and auto inside
            per_row = torch.func.vmap(lambda r: rms_norm(r, 8, w))(x)
            grad_w = torch.func.grad(lambda w: layer_norm(x, 8, w).pow(2).sum())(w)
    torch.testing.assert_close(per_row, torch.nn.functional.rms_norm(x, (8,), w))
    want = torch.func.grad(lambda w: torch.nn.functional.layer_norm(x, (8,), w).pow(2).sum())(w)
    torch.testing.assert_close(grad_w, want)
    with pytest.raises(BackendError, match="torch.func"):
        torch.func.grad(lambda w: layer_norm(x, 8, w, backend="cpu").sum())(w)
