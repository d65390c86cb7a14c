"""EVA (Paischer et al., 2024, arXiv 2410.07170): LoRA whose A starts at the inputs' principal directions.

```
x ──┬── W (m×n, frozen, unchanged) ──────────────────────┐
    └── A = V_kᵀ (r×n) ── B (m×r, zeros) ── s·(+) ──> h = x Wᵀ + s·(x Aᵀ) Bᵀ
        V_k: top-k right singular vectors of the layer's (centred) input activations
```

Init: the calibration stage (``lit_svd.calibration``, run by ``SVDInit`` inside ``fit``) accumulates the
input covariance of every adapted layer over the calibration batches (padding and label-masked tokens
left out, as PEFT's default) and takes its top eigenvectors exactly (``lit_svd.linalg.pca_components``).
``B = 0``, so the model is unchanged at init and ``W_base = W``.

Rank redistribution (``AdapterConfig.eva_rho`` = ρ > 1): each layer holds ``round(ρ r)`` rows; the
``r × layers`` components with the largest explained-variance ratio over all layers are kept and a
layer's other rows start at zero. A zero row of ``A`` with its zero column of ``B`` gets zero gradient
forever (each factor's gradient goes through the other), so a layer trains exactly its assigned rank,
while every tensor keeps a fixed shape (optimizer, DDP buckets and checkpoints need no rank pattern).
The scale stays ``alpha / r`` for every layer (PEFT's ``adjust_scaling_factors``). Trainable per layer:
``round(ρ r) (m + n)`` stored, ``k (m + n)`` effective. Merge: ``W += s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.lora import LowRankProductLayer
from lit_svd.adapters.registry import register

__all__ = ["EVALayer"]


@register("eva")
class EVALayer(LowRankProductLayer):
    method = "eva"
    calibration_statistic = "eva"

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        (V,) = self.calibration  # (n, k), k <= rank: the layer's assigned principal directions
        self.A.zero_()
        self.A[: V.shape[1]].copy_(V.T)  # (k, n); the rows beyond k stay zero (see module docstring)
        self.B.zero_()
