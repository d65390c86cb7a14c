"""LoftQ (Li et al., 2023, arXiv 2310.08659): LoRA factors fitted to the error of a quantized base.

```
x ──┬── Q_T = NF4(W − s·B_{T−1} A_{T−1}) (4-bit, frozen) ──────────────┐
    └── A (r×n) ── B (m×r): s·B A = rank-r SVD of W − deq(Q_T) ── s·(+) ──> h
```

Init, alternating ``T = loftq_iters`` times (PEFT's ``loftq_iter``, default 1), from ``L_0 = 0``:
``Q_t = NF4(W − L_{t−1})``, ``L_t = s·B_t A_t`` = the top-r SVD of ``W − deq(Q_t)``, split as in PiSSA
(``A = diag(√(S_r/s)) V_rᵀ``, ``B = U_r diag(√(S_r/s))``). The base is ``Q_T`` and the adapter ``L_T``, so
``deq(Q_T) + s·B A`` approximates ``W`` better than ``deq(NF4(W))`` alone (QLoRA). With ``T = 1`` the base is
exactly QLoRA's ``NF4(W)``. Trainable per layer: ``r (m + n)``. Needs ``base_quantization="nf4"``.

Besides the init snapshot, the layer keeps ``L_{T−1}`` (``prior_A``, ``prior_B``; zero when ``T = 1``): the
base is re-derived on load as ``NF4(W − s·prior_B prior_A)``, the same arithmetic and codes as at init.
Merge (full precision only): ``W' = deq(Q_T) + s·B A``.
"""

from __future__ import annotations

import torch

from lit_svd.adapters.base import Factors
from lit_svd.adapters.pissa import PiSSALayer
from lit_svd.adapters.registry import register
from lit_svd.linalg import residual_weight, top_r_svd
from lit_svd.quantization import nf4_round_trip

__all__ = ["LoftQLayer"]


@register("loftq")
class LoftQLayer(PiSSALayer):
    """LoftQ; ``loftq_iters``: alternating steps ``T`` (``AdapterConfig.loftq_iters``)."""

    method = "loftq"
    decomposition = "loftq"
    config_options = {"loftq_iters": "loftq_iters"}

    def __init__(self, *args, loftq_iters: int = 1, **kwargs) -> None:
        self.iters = loftq_iters
        super().__init__(*args, **kwargs)

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        super().create_adapter(dtype, device)
        # L_{T−1}, from which the base is quantized: (r, n) and (m, r) like A and B.
        self.register_buffer("prior_A", torch.zeros_like(self.A))
        self.register_buffer("prior_B", torch.zeros_like(self.B))

    @property
    def adapter_tensor_names(self) -> tuple[str, ...]:
        return (*super().adapter_tensor_names, "prior_A", "prior_B")

    def frozen_residual(self, original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # The base is W − L_{T−1} (quantized next), not W − L_T.
        return residual_weight(original, self.scaling * self.prior_B.float() @ self.prior_A.float())

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        if self.base_quantization is None:
            raise ValueError(f"layer '{self.layer_name}': loftq fits a quantized base; set base_quantization='nf4'")
        original = self.weight_matrix().detach()  # storage dtype, as the base class will quantize it
        for step in range(self.iters):
            if step:  # L_{t−1} := L_t, as stored (so a rebuild on load repeats the same arithmetic)
                self.prior_A.copy_(self.A)
                self.prior_B.copy_(self.B)
            residual = self.frozen_residual(original, None).contiguous()
            base = nf4_round_trip(residual, self.double_quantization)
            error = weight - base.to(weight.dtype)
            self.set_from_triplets(*top_r_svd(error, self.rank, method=self.svd_method, dtype=weight.dtype))
