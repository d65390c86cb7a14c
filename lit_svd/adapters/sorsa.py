"""SORSA (Cao, 2024): train the principal singular triplets, keep the singular vectors orthonormal.

```
x ──┬── W_res = W − U_p diag(S_p) V_pᵀ (frozen) ─────────┐
    └── V_p (n×r) ── ⊙ S_p (r) ── U_pᵀ (r×m) ── s·(+) ──> h = x W_resᵀ + s·((x V_p) ⊙ S_p) U_pᵀ
```

Init: ``U_p = U_r``, ``S_p = S_r``, ``V_p = V_r`` from the top-r SVD. Trainable per layer:
``r (m + n + 1)``. Merge: ``W += s·U_p diag(S_p) V_p^T``. Training adds the orthonormal regulariser
``L_orth = mean(‖U_pᵀU_p − I‖_F, ‖V_pᵀV_p − I‖_F)`` with its own step size (see
``lit_svd.inject.orthonormal_regularizer``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lit_svd.adapters.base import AdapterLayer, Factors
from lit_svd.adapters.registry import register

__all__ = ["SORSALayer"]


@register("sorsa")
class SORSALayer(AdapterLayer):
    method = "sorsa"
    decomposition = "svd"
    trainable_names = ("U", "S", "V")
    orthonormal_names = ("U", "V")
    trainable_formula = "r(m+n+1)"

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        self.U = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=dtype, device=device))
        self.S = nn.Parameter(torch.zeros(self.rank, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(self.in_features, self.rank, dtype=dtype, device=device))

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        U, S, V = factors
        self.U.copy_(U)
        self.S.copy_(S)
        self.V.copy_(V)

    def low_rank_factors(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return t["U"] * (self.scaling * t["S"]), t["V"]
