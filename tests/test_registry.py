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
