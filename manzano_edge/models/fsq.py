"""Finite scalar quantization (Mentzer et al., 2023): round each of a few bounded channels to
a fixed number of levels. The codebook is implicit (the product of the levels), so it cannot
collapse and needs no commitment loss. Rounding uses a straight-through estimator.
"""

from __future__ import annotations

import torch
from torch import nn


class FSQ(nn.Module):
    def __init__(self, levels: list[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.levels = list(levels)
        self.eps = eps
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.float32), dim=0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(self._levels).item())

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., d] -> codes [..., d], each in [-1, 1] on the level grid (straight-through)."""
        bounded = self._bound(z.float())  # rounding in fp32, also when training under bf16 autocast
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / (self._levels // 2)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half_width = self._levels // 2
        digits = torch.round(codes * half_width + half_width)
        return (digits * self._basis).sum(-1).to(torch.int64)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.remainder(torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor"), self._levels)
        half_width = self._levels // 2
        return (digits - half_width) / half_width
