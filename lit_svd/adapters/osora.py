"""OSoRA (Han et al., 2025, arXiv 2505.14350): train singular values and an output-dimension vector.

```
x ──┬── W_res = W − U_r diag(σ) V_rᵀ (frozen) ─────────────────────┐
    └── V_r (frozen) ── ⊙ σ (r) ── U_rᵀ (frozen) ── ⊙ o (m) ── (+) ──> h
```

h = x W_resᵀ + o ⊙ (((x V_r) ⊙ σ) U_rᵀ). Init: ``σ = S_r``, ``o = 1`` (so the model is unchanged),
singular vectors frozen as buffers. Trainable per layer: ``r + m``. Merge:
``W += diag(o) U_r diag(σ) V_r^T``. The paper's method section scales the output dimension of the
SVD-initialised low-rank product by a learnable vector and updates only ``S_r`` and ``o``; it has no
``alpha`` scaling, so ``AdapterConfig.alpha`` must stay ``None`` for this method.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lit_svd.adapters.base import AdapterLayer, Factors
from lit_svd.adapters.registry import register

__all__ = ["OSoRALayer"]


@register("osora")
class OSoRALayer(AdapterLayer):
    method = "osora"
    decomposition = "svd"
    trainable_names = ("S", "output_scale")
    frozen_names = ("U", "V")
    monitored_vectors = ("output_scale",)
    scaled = False
    trainable_formula = "r+m"

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        self.register_buffer("U", torch.zeros(self.out_features, self.rank, dtype=dtype, device=device))
        self.register_buffer("V", torch.zeros(self.in_features, self.rank, dtype=dtype, device=device))
        self.S = nn.Parameter(torch.zeros(self.rank, dtype=dtype, device=device))
        self.output_scale = nn.Parameter(torch.ones(self.out_features, dtype=dtype, device=device))

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        U, S, V = factors
        self.U.copy_(U)
        self.V.copy_(V)
        self.S.copy_(S)
        self.output_scale.fill_(1.0)

    def low_rank_factors(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return t["output_scale"][:, None] * t["U"] * t["S"], t["V"]
