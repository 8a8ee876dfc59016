"""What the extension backends (``cpu``, ``cuda``) of every op family share: whether the C++ /
CUDA extension can serve an op now, and ``auto``'s policy about compiling it.

``auto`` never starts a compiler on a CPU machine on its own (the default training path must
work without one): there it takes the extension only when it is already built (ahead of time,
or an earlier just-in-time build from the same sources) or ``TURBOLM_BUILD_EXT=1`` is set. A
backend named explicitly builds the extension on first use.
"""

from __future__ import annotations

import os

import torch


def _ext():
    from turbolm import ext  # imported on first use: `python -m turbolm.ext` stays clean

    return ext


def cpu_compile_allowed() -> bool:
    """Whether ``auto`` may build the extension on a CPU machine (``TURBOLM_BUILD_EXT=1``)."""
    return os.environ.get("TURBOLM_BUILD_EXT") == "1"


def ext_reason(auto: bool, compile_ok: bool, op: str, folder: str, on_loaded=None) -> str | None:
    """None when the loaded extension has ``torch.ops.turbolm.<op>`` (loading or building it now
    when allowed), else why not. ``folder``: the op family's ``csrc/`` folder (for the message
    when a partial build, ``TURBOLM_EXT_OPS``, left it out). ``on_loaded()`` runs once the op is
    there (e.g. registering its fake implementations)."""
    ext = _ext()
    if auto and not compile_ok and not ext.is_built():
        return (
            "extension not built yet (auto does not compile it on CPU; use backend='cpu', "
            "set TURBOLM_BUILD_EXT=1, or run `python -m turbolm.ext`)"
        )
    if ext.load_extension() is None:
        return f"extension not built: {ext.extension_status(build=False)[1]}"
    if not hasattr(torch.ops.turbolm, op):
        return (
            f"the loaded extension has no {op} op (built without csrc/{folder}, see "
            "TURBOLM_EXT_OPS)"
        )
    if on_loaded is not None:
        on_loaded()
    return None
