"""turbolm: a custom-kernel training engine for Transformer and RNN language models."""

__version__ = "0.1.0"

from turbolm.ops.registry import use_backend  # noqa: E402

__all__ = ["__version__", "use_backend"]
