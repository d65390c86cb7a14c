"""PiSSA (Meng et al., 2024): LoRA whose factors start at the principal singular triplets.

```
x ──┬── W_res = W − s·B A (frozen) ─────────────────────────┐
    └── A = diag(√(S_r/s)) V_rᵀ ── B = U_r diag(√(S_r/s)) ── s·(+) ──> h
```

Init: top-r SVD ``W ≈ U_r diag(S_r) V_r^T``; ``s·B A = U_r diag(S_r) V_r^T`` is the principal part and
the frozen base keeps the residual. Trainable per layer: ``r (m + n)``. Merge: ``W += s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.lora import LowRankProductLayer
from lit_svd.adapters.registry import register

__all__ = ["PiSSALayer"]


@register("pissa")
class PiSSALayer(LowRankProductLayer):
    method = "pissa"
    decomposition = "svd"

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        self.set_from_triplets(*factors)
