"""A new adapter in one file: "svd-scale" trains only the top-r singular values of each weight.

```
x ──┬── W_res = W − s·U_r diag(σ) V_rᵀ (frozen) ──────────┐
    └── V_r (frozen) ── ⊙ s·σ (r) ── U_rᵀ (frozen) ── (+) ──> h = x W_resᵀ + s·((x V_r) ⊙ σ) U_rᵀ
```

Init: top-r SVD of ``W``; ``σ = S_r``, ``U_r``/``V_r`` frozen buffers. Trainable per layer: ``r``.
Merge: ``W += s·U_r diag(σ) V_rᵀ``. (OSoRA without its output vector; a worked example for
docs/adding_an_adapter.md, checked by tests/test_docs.py.) To ship it, move the file to
``lit_svd/adapters/svd_scale.py`` and add ``from lit_svd.adapters.svd_scale import SVDScaleLayer`` to
``lit_svd/adapters/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lit_svd.adapters.base import AdapterLayer
from lit_svd.adapters.registry import register

__all__ = ["SVDScaleLayer"]


@register("svd-scale")
class SVDScaleLayer(AdapterLayer):
    method = "svd-scale"
    decomposition = "svd"  # initialize_adapters passes the batched top-r SVD (U, S, V) to init_from_base
    trainable_names = ("S",)  # nn.Parameters: trained, saved, snapshotted as init_S
    frozen_names = ("U", "V")  # buffers: saved in adapter checkpoints, never trained

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        self.register_buffer("U", torch.zeros(self.out_features, self.rank, dtype=dtype, device=device))  # (m, r)
        self.register_buffer("V", torch.zeros(self.in_features, self.rank, dtype=dtype, device=device))  # (n, r)
        self.S = nn.Parameter(torch.zeros(self.rank, dtype=dtype, device=device))  # (r,)

    def init_from_base(self, weight: torch.Tensor, factors: tuple[torch.Tensor, ...] | None) -> None:
        U, S, V = factors  # float32 (or float64), U (m, r), S (r,), V (n, r)
        self.U.copy_(U)
        self.V.copy_(V)
        self.S.copy_(S)

    def low_rank_factors(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # delta = P Qᵀ with P (m, r), Q (n, r); merge, residual, export and monitoring all use this.
        return t["U"] * (self.scaling * t["S"]), t["V"]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., n) → (..., r) → (..., m); the m×n product is never formed.
        return F.linear((x @ self.V) * (self.S * self.scaling), self.U)
