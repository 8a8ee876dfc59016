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

Selection runs on every op call, so it is cheap: the ``TURBOLM_BACKEND`` value is parsed once
per distinct value, and an op that passes ``select(..., cache_key=...)`` gets its successful
selections cached per (op, device type, requested name, cache_key). The op chooses
``cache_key`` so that it determines what ``available()`` / ``supports()`` answer for those
inputs (e.g. dtypes, plus any state they read, such as whether the extension is built).
Failures are never cached (each call re-raises with the current reason), the cache is cleared
whenever a backend is registered, and a cached backend is used only while it is still the one
registered under its name.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

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
# Successful selections of ops that pass a cache_key:
# (op, device type, name, key) -> (the op's backend table then, Backend).
_SELECTED: dict[tuple, tuple[dict[str, Backend], Backend]] = {}
_SELECTED_MAX = 4096  # cleared when full (keys are op-chosen; a runaway key must not leak)
_ENV_SPEC: tuple[str, dict[str, str]] = ("", {})  # last parsed TURBOLM_BACKEND value
_NO_KEY = object()
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
    clear_selection_cache()  # an earlier `auto` choice may now have a better candidate
    return backend


def clear_selection_cache() -> None:
    """Forget every cached selection (see the module docstring)."""
    _SELECTED.clear()


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
    if not isinstance(spec, str | dict):
        raise BackendError(
            f"use_backend: spec must be a backend name, 'op=name,...' or a dict op -> name, "
            f"got {type(spec).__name__}"
        )
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
    global _ENV_SPEC
    env = os.environ.get("TURBOLM_BACKEND")
    if env:
        if env == _ENV_SPEC[0]:
            mapping = _ENV_SPEC[1]
        else:  # parsed once per distinct value; an invalid value raises on every call
            mapping = _parse_spec(env.strip(), "TURBOLM_BACKEND")
            _ENV_SPEC = (env, mapping)
        name = mapping.get(op, mapping.get("*"))
        if name is not None:
            return name, "TURBOLM_BACKEND"
    return "auto", "default"


def select(
    op: str, device_type: str, explicit: str | None = None, *, cache_key=_NO_KEY, **inputs
) -> Backend:
    """Choose the backend that runs ``op`` on ``inputs`` (see module docstring).

    ``cache_key``: a hashable value that, with ``op``, ``device_type`` and the requested
    backend name, determines whether each backend supports ``inputs``; successful selections
    are then cached under it (see the module docstring). Without it nothing is cached.
    """
    backends = _REGISTRY.get(op)
    if not backends:
        raise BackendError(f"no backend is registered for op {op!r}")
    name, source = requested_backend(op, explicit)
    if _functorch_active():
        return _select_for_functorch(op, device_type, name, source, backends, inputs)
    if cache_key is _NO_KEY:
        return _select(op, device_type, name, source, backends, inputs)
    slot = (op, device_type, name, cache_key)
    hit = _SELECTED.get(slot)
    # Valid while the op's table and the chosen entry are the ones it was selected from.
    if hit is not None and hit[0] is backends and backends.get(hit[1].name) is hit[1]:
        return hit[1]
    backend = _select(op, device_type, name, source, backends, inputs)
    if len(_SELECTED) >= _SELECTED_MAX:
        _SELECTED.clear()
    _SELECTED[slot] = (backends, backend)
    return backend


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev ...) is running: not torch.compile's
    own functionalization, and not while Dynamo traces (it shows an interpreter there too)."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    top = peek() if peek is not None else None
    if top is None or torch.compiler.is_compiling():
        return False
    return top.key() != functorch.TransformType.Functionalize


def _select_for_functorch(op, device_type, name, source, backends, inputs) -> Backend:
    """Under torch.func only the autograd-native backends work (the kernel backends' single
    autograd.Function has no vmap / functorch support): ``auto`` takes them, and a kernel
    backend asked for by name is refused with a BackendError saying so."""
    native = {n: b for n, b in backends.items() if b.is_autograd_native}
    if name != "auto" and name in backends and name not in native:
        raise BackendError(
            f"{op}: backend {name!r} (from {source}) cannot run inside torch.func transforms "
            f"(vmap, grad, jacrev ...); use one of {sorted(native)}"
        )
    return _select(op, device_type, name, source, native or backends, inputs)


def _select(
    op: str, device_type: str, name: str, source: str, backends: dict[str, Backend], inputs: dict
) -> Backend:
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
