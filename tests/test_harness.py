"""The harness itself must fail on wrong outputs and on wrong gradients."""

import pytest
import torch

from tests.harness import OpCase, check_backend
from turbolm.ops import registry
from turbolm.ops.norm import layer_norm_reference


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


@pytest.fixture
def broken_backends():
    registry.register(
        "harness_toy", "reference", fn=lambda x: layer_norm_reference(x, (x.shape[-1],))
    )
    registry.register(
        "harness_toy", "torch", fn=lambda x: layer_norm_reference(x, (x.shape[-1],), eps=1e-2)
    )
    registry.register(
        "harness_toy",
        "cpu",
        fn=lambda x: _WrongGrad.apply(layer_norm_reference(x, (x.shape[-1],))),
    )
    yield
    registry._REGISTRY.pop("harness_toy")


def _case():
    def call(backend, x):
        return registry.select("harness_toy", "cpu", backend).fn(x)

    return OpCase(
        "toy",
        call,
        lambda g: {"x": torch.randn(4, 32, generator=g, dtype=torch.float64)},
        grad=("x",),
    )


def test_harness_rejects_wrong_output(broken_backends):
    with pytest.raises(AssertionError, match="out0"):
        check_backend(_case(), "torch", torch.float32)


def test_harness_rejects_wrong_gradient(broken_backends):
    with pytest.raises(AssertionError, match="dx"):
        check_backend(_case(), "cpu", torch.float32)


def test_harness_accepts_the_reference_itself(broken_backends):
    check_backend(_case(), "reference", torch.float32)
