"""What the Triton backends of every op family share: is Triton installed, and do its kernels
run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""

from __future__ import annotations

import importlib.util
import os
import sys


def triton_available() -> str | None:
    """None when triton can be imported, else why not (for ``Backend.available``)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def triton_interpreting(kernels_module: str) -> bool:
    """Whether ``kernels_module`` (e.g. ``turbolm.kernels.norm``) runs under the interpreter.

    Triton fixes the mode when the kernels are imported, so once they are, their own
    ``INTERPRET`` flag is the answer; before that, the environment variable is.
    """
    module = sys.modules.get(kernels_module)
    if module is not None:
        return bool(module.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
