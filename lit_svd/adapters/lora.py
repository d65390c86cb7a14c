"""LoRA (Hu et al., 2021): a zero-initialised low-rank update next to the frozen weight.

```
x ──┬── W (m×n, frozen) ─────────────────────┐
    └── A (r×n, Kaiming) ── B (m×r, zeros) ── s·(+) ──> h = x Wᵀ + s·(x Aᵀ) Bᵀ
```

Init: ``A`` Kaiming-uniform (a=√5, as PEFT), ``B = 0``, so the model is unchanged at init and
``W_base = W``. Trainable per layer: ``r (m + n)``. Merge: ``W += s·B A``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from lit_svd.adapters.base import AdapterLayer, Factors
from lit_svd.adapters.registry import register

__all__ = ["LoRALayer", "LowRankProductLayer"]


class LowRankProductLayer(AdapterLayer):
    """Shared by LoRA, PiSSA and OLoRA: trainable ``A`` (r, n) and ``B`` (m, r), delta ``s·B A``."""

    trainable_names = ("A", "B")
    trainable_formula = "r(m+n)"

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=dtype, device=device))

    def low_rank_factors(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scaling * t["B"], t["A"].T

    def set_from_triplets(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Set ``s·B A = U diag(S) Vᵀ``, split evenly as PiSSA does: ``A = diag(√(S/s)) Vᵀ`` (r, n) and
        ``B = U diag(√(S/s))`` (m, r), from ``U`` (m, r), ``S`` (r,), ``V`` (n, r)."""
        root = (S / self.scaling).sqrt()
        self.A.copy_(root[:, None] * V.T)
        self.B.copy_(U * root)


@register("lora")
class LoRALayer(LowRankProductLayer):
    """LoRA; ``A`` is drawn at construction like PEFT, so init never reads the weight."""

    method = "lora"

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        super().create_adapter(dtype, device)
        if not self.A.is_meta:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        if self.A.is_meta:
            raise ValueError(f"layer '{self.layer_name}' has meta tensors; materialise the model first")
