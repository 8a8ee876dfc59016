"""Ops: functional API over interchangeable backends (see ``turbolm.ops.registry``)."""

from turbolm.ops.attention import attention
from turbolm.ops.norm import layer_norm, rms_norm
from turbolm.ops.registry import registered, select, use_backend

__all__ = ["attention", "layer_norm", "registered", "rms_norm", "select", "use_backend"]
