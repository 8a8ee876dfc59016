"""Drop-in LayerNorm / RMSNorm: subclasses of the torch.nn modules (same constructor arguments,
parameters and state_dict keys) whose forward runs turbolm's op backends."""

from __future__ import annotations

import torch

from turbolm.ops.norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` running ``turbolm.ops.layer_norm``. Input (..., *normalized_shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` running ``turbolm.ops.rms_norm``. Input (..., *normalized_shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
