"""MiLoRA (Wang et al., 2024, arXiv 2406.09044): PiSSA's mirror image — LoRA on the *minor* singular triplets.

```
x ──┬── W_res = W − s·B A (frozen: the principal part) ─────────┐
    └── A = diag(√(S_min/s)) V_minᵀ ── B = U_min diag(√(S_min/s)) ── s·(+) ──> h
```

Init: the r smallest singular triplets ``W = … + U_min diag(S_min) V_minᵀ`` (a full float64 SVD,
``lit_svd.linalg.bottom_r_svd``: the bottom of the spectrum is where fast eigensolvers lose accuracy);
``s·B A`` starts as that minor part and the frozen base keeps the principal rest, so fine-tuning moves the
directions the pretrained weight uses least. Trainable per layer: ``r (m + n)``. Merge: ``W += s·B A``.

Not PEFT's ``init_lora_weights="mica"`` (MiCA): MiCA sets B to the same minor left singular vectors but
freezes it, starts A at zero and leaves W unchanged; MiLoRA trains both factors, scaled by √S_min, and
moves the minor part out of W. Their B spans the same subspace at init (tests/test_milora.py).
"""

from __future__ import annotations

from lit_svd.adapters.pissa import PiSSALayer
from lit_svd.adapters.registry import register

__all__ = ["MiLoRALayer"]


@register("milora")
class MiLoRALayer(PiSSALayer):
    method = "milora"
    decomposition = "minor_svd"
