"""CorDA (Yang et al., 2024, arXiv 2406.05223): PiSSA on the weight as the task's inputs see it.

```
x ──┬── W_res = W − s·B A (frozen) ───────────────────────────────┐
    └── A = diag(√(S/s)) V̂ᵀ ── B = U diag(√(S/s)) ── s·(+) ──> h
           W C = U diag(S) Vᵀ,  V̂ = C⁻¹ V   (C: covariance of the layer's inputs on calibration data)
```

Init: the calibration stage (``lit_svd.calibration``, run by ``SVDInit`` inside ``fit``) collects
``C = mean over sequences of X̃ᵀ X̃`` (``X̃``: a sequence's layer inputs scaled by its largest value, as
PEFT does), then ``lit_svd.linalg.corda_factors`` decomposes ``W C`` and maps it back, so
``W = U diag(S) V̂ᵀ`` exactly. ``AdapterConfig.corda_mode``: ``"ipm"`` (instruction-previewed) gives
the adapter the r largest components; ``"kpm"`` (knowledge-preserving) the r smallest, leaving the
components the calibration data use in the frozen residual. Trainable per layer: ``r (m + n)``.
Merge: ``W += s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.lora import LowRankProductLayer
from lit_svd.adapters.registry import register

__all__ = ["CorDALayer"]


@register("corda")
class CorDALayer(LowRankProductLayer):
    method = "corda"
    decomposition = "calibrated"
    calibration_statistic = "corda"

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        self.set_from_triplets(*self.calibration)  # U, S, V̂ of lit_svd.linalg.corda_factors
