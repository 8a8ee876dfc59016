"""Backend registry and selection.

Every op (``layer_norm``, ``rms_norm``, ``attention``, ``lstm`` ...) has one or more backends:

* autograd-native backends (``reference``, ``torch``) register a differentiable callable that the
  op calls directly; autograd computes the gradients.
* kernel backends (``triton``, ``cuda``, ``cpu``) register ``fwd(*inputs, **params) -> (out, *saved)``
  and ``bwd(grad_out, *saved, **params) -> grads``; the op's single ``torch.autograd.Function``
  serves all of them.

Which backend runs is decided, first match wins, by: the op's ``backend=`` argument, the
innermost ``use_backend(...)`` context, the ``TURBOLM_BACKEND`` environment variable
(``name`` for every op, or ``op=name,op=name``), else ``auto``. ``auto`` walks
:data:`AUTO_ORDER` for the inputs' device and takes the first registered backend whose
``supports`` accepts the inputs. A backend chosen by name never falls back: if it cannot run,
:class:`~turbolm.errors.BackendError` says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from turbolm.errors import BackendError

BACKEND_NAMES = ("reference", "torch", "triton", "cuda", "cpu")

# Preference of `auto`, per device type. Kernel backends come first once they are registered
# and benchmarks show them fastest; until then the torch baseline is chosen.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch", "reference"),
    "cpu": ("cpu", "torch", "reference"),
}

# supports(**op_inputs, auto=bool) -> None when the backend can run them, else the reason it
# cannot; `auto` says whether `auto` is trying it (True) or it was asked for by name (False).
SupportsFn = Callable[..., "str | None"]


@dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    op: str
    name: str
    fn: Callable | None = None  # differentiable callable (autograd-native backends)
    fwd: Callable | None = None  # kernel backends: fwd(...) -> (out, *saved)
    bwd: Callable | None = None  # kernel backends: bwd(grad_out, *saved) -> grads
    supports: SupportsFn | None = None
    available: Callable[[], str | None] = field(default=lambda: None)  # None = usable here

    @property
    def is_autograd_native(self) -> bool:
        return self.fn is not None

    def why_not(self, **inputs) -> str | None:
        """None if this backend can run these inputs, else a human-readable reason."""
        reason = self.available()
        if reason is None and self.supports is not None:
            reason = self.supports(**inputs)
        return reason


_REGISTRY: dict[str, dict[str, Backend]] = {}
_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "turbolm_backend", default=None
)


def register(
    op: str,
    name: str,
    *,
    fn: Callable | None = None,
    fwd: Callable | None = None,
    bwd: Callable | None = None,
    supports: SupportsFn | None = None,
    available: Callable[[], str | None] | None = None,
) -> Backend:
    """Register backend ``name`` of ``op``: either ``fn`` or the pair ``fwd``/``bwd``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {name!r}; expected one of {BACKEND_NAMES}")
    if (fn is None) == (fwd is None or bwd is None):
        raise ValueError("register either fn=... or both fwd=... and bwd=...")
    backend = Backend(op, name, fn, fwd, bwd, supports, available or (lambda: None))
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def registered(op: str) -> dict[str, Backend]:
    """The backends registered for ``op`` (name -> Backend)."""
    return dict(_REGISTRY.get(op, {}))


def ops() -> list[str]:
    return sorted(_REGISTRY)


def _parse_spec(spec: str, source: str) -> dict[str, str]:
    """``"torch"`` -> {"*": "torch"}; ``"attention=triton,layer_norm=cuda"`` -> per-op map."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, sep, name = part.rpartition("=")
        key = op.strip() if sep else "*"
        name = name.strip()
        if name not in BACKEND_NAMES + ("auto",):
            raise BackendError(
                f"{source}: unknown backend {name!r}; expected one of {BACKEND_NAMES + ('auto',)}"
            )
        mapping[key] = name
    return mapping


@contextlib.contextmanager
def use_backend(spec: str | dict[str, str]) -> Iterator[None]:
    """Run the enclosed ops with the given backend(s).

    ``spec`` is a backend name for every op, ``"op=name,..."``, or a dict op -> name.
    """
    mapping = dict(spec) if isinstance(spec, dict) else _parse_spec(spec, "use_backend")
    for name in mapping.values():
        if name not in BACKEND_NAMES + ("auto",):
            raise BackendError(f"use_backend: unknown backend {name!r}")
    outer = _CONTEXT.get() or {}
    token = _CONTEXT.set({**outer, **mapping})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def requested_backend(op: str, explicit: str | None = None) -> tuple[str, str]:
    """The backend asked for and where the request came from (for error messages)."""
    if explicit is not None:
        return explicit, "backend= argument"
    context = _CONTEXT.get()
    if context:
        name = context.get(op, context.get("*"))
        if name is not None:
            return name, "use_backend(...)"
    env = os.environ.get("TURBOLM_BACKEND", "").strip()
    if env:
        mapping = _parse_spec(env, "TURBOLM_BACKEND")
        name = mapping.get(op, mapping.get("*"))
        if name is not None:
            return name, "TURBOLM_BACKEND"
    return "auto", "default"


def select(op: str, device_type: str, explicit: str | None = None, **inputs) -> Backend:
    """Choose the backend that runs ``op`` on ``inputs`` (see module docstring)."""
    backends = _REGISTRY.get(op)
    if not backends:
        raise BackendError(f"no backend is registered for op {op!r}")
    name, source = requested_backend(op, explicit)
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER.get(device_type, ("torch", "reference")):
            backend = backends.get(candidate)
            if backend is None:
                continue
            # `auto=True` lets supports() decline what only a request by name may do
            # (e.g. compile the extension, or use kernels not yet verified on a GPU).
            reason = backend.why_not(**{**inputs, "auto": True})
            if reason is None:
                return backend
            reasons.append(f"{candidate}: {reason}")
        raise BackendError(f"{op}: no backend can run these inputs ({'; '.join(reasons)})")
    if name not in BACKEND_NAMES:
        raise BackendError(f"{op}: unknown backend {name!r} (from {source})")
    backend = backends.get(name)
    if backend is None:
        raise BackendError(
            f"{op}: backend {name!r} (from {source}) is not available; "
            f"registered: {sorted(backends)}"
        )
    reason = backend.why_not(**{**inputs, "auto": False})
    if reason is not None:
        raise BackendError(f"{op}: backend {name!r} (from {source}) cannot run: {reason}")
    return backend
