"""The shared op-checking harness (DESIGN.md "Testing").

For one op case, backend and dtype it checks the output and every input gradient against an
fp64 run of the ``reference`` backend with the FlashAttention bound

    max|out - ref64| <= 2 * max|baseline - ref64| + atol[dtype] * max(1, max|ref64|)

where ``baseline`` is the ``reference`` backend run in the same low dtype (the error a
straightforward PyTorch implementation makes in that dtype). Inputs are fresh random data on
every call; the same upstream gradient is used for every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class OpCase:
    """``call(backend, **inputs)`` returns a tensor or tuple of tensors.

    ``make_inputs(generator)`` returns fp64 master tensors (dict); names in ``grad`` are
    differentiated; ``cast`` lists the inputs converted to the test dtype (the others, such as
    integer lengths or bool masks, are passed as they are).
    """

    name: str
    call: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    make_inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    grad: tuple[str, ...] = ()
    cast: tuple[str, ...] | None = None  # None = all floating inputs
    atol: dict = field(default_factory=dict)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(case: OpCase, backend: str, masters, dtype, device, grad_outs=None):
    """Run one backend; returns (outputs, grads-by-name) as fp64 CPU tensors."""
    inputs = {}
    for name, t in masters.items():
        cast = case.cast is None and t.is_floating_point() or (case.cast and name in case.cast)
        t = t.to(device=device, dtype=dtype) if cast else t.to(device)
        if name in case.grad:
            t = t.detach().requires_grad_(True)
        inputs[name] = t
    outs = _as_tuple(case.call(backend, **inputs))
    grads = {}
    if case.grad and grad_outs is not None:
        diff = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]
        tensors = [inputs[n] for n in case.grad]
        got = torch.autograd.grad(
            [o for o, _ in diff],
            tensors,
            [g.to(device=device, dtype=o.dtype) for o, g in diff],
            allow_unused=True,
        )
        grads = {
            n: (g.double().cpu() if g is not None else torch.zeros_like(masters[n]))
            for n, g in zip(case.grad, got)
        }
    return [o.detach().double().cpu() for o in outs], grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


def check_backend(
    case: OpCase, backend: str, dtype: torch.dtype, device: str = "cpu", seed: int | None = None
) -> dict[str, float]:
    """Assert ``backend`` meets the bound for every output and gradient; returns the errors."""
    gen = torch.Generator().manual_seed(
        seed if seed is not None else torch.randint(0, 2**31, ()).item()
    )
    masters = case.make_inputs(gen)
    ref_outs, _ = _run(case, "reference", masters, torch.float64, "cpu", None)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref_outs]
    ref_outs, ref_grads = _run(case, "reference", masters, torch.float64, "cpu", grad_outs)
    base_outs, base_grads = _run(case, "reference", masters, dtype, device, grad_outs)
    outs, grads = _run(case, backend, masters, dtype, device, grad_outs)
    atol = case.atol.get(dtype, ATOL[dtype])
    errors = {}
    pairs = [(f"out{i}", o, b, r) for i, (o, b, r) in enumerate(zip(outs, base_outs, ref_outs))]
    pairs += [(f"d{n}", grads[n], base_grads[n], ref_grads[n]) for n in case.grad]
    for label, got, base, ref in pairs:
        assert got.shape == ref.shape, f"{case.name}/{label}: shape {got.shape} != {ref.shape}"
        assert torch.isfinite(got).all(), f"{case.name}/{label}: non-finite values ({backend})"
        err, base_err = max_err(got, ref), max_err(base, ref)
        scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        bound = 2 * base_err + atol * scale
        errors[label] = err
        assert err <= bound, (
            f"{case.name} [{backend}, {dtype}] {label}: max error {err:.3g} > bound {bound:.3g} "
            f"(baseline error {base_err:.3g})"
        )
    return errors


def assert_fresh_process_prints(script: str, marker: str) -> None:
    """Run ``script`` in a new Python process (repository root, ``TURBOLM_BACKEND`` unset, so
    nothing turbolm loaded here is loaded there) and assert it succeeds and prints ``marker``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in os.environ.items() if k != "TURBOLM_BACKEND"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and marker in result.stdout, (
        result.stdout[-2000:] + result.stderr[-4000:]
    )
