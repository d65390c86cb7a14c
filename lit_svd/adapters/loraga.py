"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000): LoRA whose first step follows the full fine-tuning gradient.

```
x ──┬── W_res = W − s·B₀ A₀ (frozen) ─────────────────────────────────────┐
    └── A = V_{:r}ᵀ ── B = U_{r:2r} diag(S_{r:2r})·m^{1/4}/√γ ── s·(+) ──> h
        G = mean over calibration batches of dL/dW = U diag(S) Vᵀ (top 2r triplets)
```

Init: the calibration stage (``lit_svd.calibration``, run by ``SVDInit`` inside ``fit``) back-propagates the
loss of each calibration batch and sums every adapted layer's full weight gradient ``dL/dW`` (m×n, float32);
``lit_svd.linalg.loraga_factors`` takes the top 2r singular triplets of their mean and splits them as PEFT
0.21's defaults do (``direction="ArB2r"``, ``scale="stable"``, γ = 16). ``s·B A`` is taken out of the base
weight, so the model is unchanged at init. Trainable per layer: ``r (m + n)``; needs ``2r <= min(m, n)``.
Merge: ``W += s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.lora import LowRankProductLayer
from lit_svd.adapters.registry import register

__all__ = ["LoRAGALayer"]


@register("loraga")
class LoRAGALayer(LowRankProductLayer):
    method = "loraga"
    decomposition = "calibrated"
    calibration_statistic = "gradient"

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        A, B = self.calibration  # (r, n), (m, r): lit_svd.linalg.loraga_factors
        self.A.copy_(A)
        self.B.copy_(B)
