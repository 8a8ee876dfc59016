"""Input checks shared by every op. Each failure raises a typed error naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbolm.errors import DeviceError, DTypeError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, tensor: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    """``tensor`` is a tensor of one of ``dtypes`` (floating point by default)."""
    check_tensor(name, tensor)
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise DTypeError(
            f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).replace('torch.', '')}"
        )


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    dtype = None
    for t in tensors.values():  # the common, passing case: no containers built
        if t is not None:
            if dtype is None:
                dtype = t.dtype
            elif t.dtype != dtype:
                present = {k: t for k, t in tensors.items() if t is not None}
                listing = ", ".join(
                    f"{k}={str(t.dtype).replace('torch.', '')}" for k, t in present.items()
                )
                raise DTypeError(f"tensors must share one dtype, got {listing}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors live on one device; returns it."""
    device = None
    for t in tensors.values():  # the common, passing case: no containers built
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                present = {k: t for k, t in tensors.items() if t is not None}
                listing = ", ".join(f"{k} on {t.device}" for k, t in present.items())
                raise DeviceError(f"tensors must be on the same device, got {listing}")
    if device is None:
        raise ValueError("check_same_device needs at least one tensor")  # a caller's bug
    return device


def check_ndim(name: str, tensor: torch.Tensor, ndims: int | Sequence[int], layout: str = ""):
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if tensor.dim() not in allowed:
        hint = f" {layout}" if layout else ""
        raise ShapeError(
            f"{name} must have {' or '.join(map(str, allowed))} dimensions{hint}, "
            f"got shape {tuple(tensor.shape)}"
        )


def check_shape(name: str, tensor: torch.Tensor | None, expected: Sequence[int]) -> None:
    """``tensor`` is None or has exactly shape ``expected``."""
    if tensor is not None and tuple(tensor.shape) != tuple(expected):
        raise ShapeError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")
