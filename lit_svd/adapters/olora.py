"""OLoRA (Büyükakyüz, 2024): LoRA whose factors start at the leading part of a QR decomposition.

```
x ──┬── W_res = W − s·B A (frozen) ───────────┐
    └── A = R[:r, :] ── B = Q[:, :r] ── s·(+) ──> h
```

Init: thin QR ``W = Q R``; ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r, :]``.
Trainable per layer: ``r (m + n)``. Merge: ``W += s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.lora import LowRankProductLayer
from lit_svd.adapters.registry import register

__all__ = ["OLoRALayer"]


@register("olora")
class OLoRALayer(LowRankProductLayer):
    method = "olora"
    decomposition = "qr"

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        Q_r, R_r = factors
        self.A.copy_(R_r)  # (r, n)
        self.B.copy_(Q_r)  # (m, r)
