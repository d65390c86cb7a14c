"""DoRA (Liu et al., 2024, arXiv 2402.09353): a trained magnitude per output row, LoRA on the direction.

```
x ──┬── W_base (m×n, frozen) ──────────────────────────┐
    └── A (r×n) ── B (m×r) ── s· ──────────────────────(+)── V x ── ⊙ m / ‖W_base + s·B A‖_row ──> h
```

h = diag(m / ‖W_base + s·B A‖_row) (W_base + s·B A) x + bias (the paper's Eq. 5, and PEFT's ``use_dora=True``).
Init: ``m`` = the row norms ``‖W_i,:‖`` of the original weight (one per output feature, as PEFT:
``torch.linalg.norm(W + s·B A, dim=1)``), ``A`` Kaiming, ``B = 0`` (``init="lora"``), or the principal
singular triplets with the residual as frozen base (``init="pissa"``: "SVD-initialised DoRA", PEFT's
``init_lora_weights="pissa", use_dora=True``). Either way the model is unchanged at init.
Trainable per layer: ``r (m + n) + m``.

The row norm is treated as a constant in backward (the paper's §4.3; PEFT detaches it too), so gradients
reach ``m`` through ``m / ‖·‖`` and ``A``, ``B`` only through the direction's numerator. It is computed from
low-rank terms, never forming the m×n matrix ``W_base + s·B A``:

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ

``‖W_i‖²`` is cached (``W_base`` is frozen; the cache follows the stored weight's version counter, for a 4-bit base
the packed codes'), ``W Aᵀ`` (m×r)
is one pass over ``W`` per step and ``A Aᵀ`` is r×r. PEFT instead forms ``B A`` through an n×n identity
and then ``W + s·B A``. Merge: ``W ← diag(m / ‖W + s·B A‖_row) (W + s·B A)``, exact (the norm is formed
densely there, once).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from lit_svd.adapters.base import BaseLinear, Factors
from lit_svd.adapters.lora import LoRALayer
from lit_svd.adapters.registry import register
from lit_svd.linalg import row_shard

__all__ = ["DoRALayer"]


@register("dora")
class DoRALayer(LoRALayer):
    """DoRA on one linear layer; the other arguments (scaling, dropout, …) are ``AdapterLayer``'s.

    Args:
        base_layer: The ``nn.Linear`` / ``Conv1D`` to adapt (frozen).
        rank: Rank ``r`` of the direction's update ``B A``.
        init: ``"lora"`` (A Kaiming, B = 0) or ``"pissa"`` (top-r SVD factors, residual as base) for the
            direction; ``AdapterConfig.dora_init``.
    """

    method = "dora"
    trainable_names = ("A", "B", "magnitude")
    monitored_vectors = ("magnitude",)
    config_options = {"dora_init": "init"}
    trainable_formula = "r(m+n)+m"

    def __init__(
        self, base_layer: BaseLinear, rank: int, *args, init: Literal["lora", "pissa"] = "lora", **kwargs
    ) -> None:
        if init not in ("lora", "pissa"):
            raise ValueError(f"DoRA init must be 'lora' or 'pissa', got {init!r}")
        # Set before AdapterLayer.__init__, which registers the init snapshots the SVD variant needs.
        self.init_scheme = init
        self.decomposition = "svd" if init == "pissa" else None
        super().__init__(base_layer, rank, *args, **kwargs)
        self._row_norms_sq: tuple[tuple, torch.Tensor] | None = None  # (weight identity, ‖W_i‖² (m,))
        self._norm: tuple[tuple, torch.Tensor] | None = None  # (identity of W, A, B, s; ‖W + s·B A‖_row (m,))
        self._merge_scale: torch.Tensor | None = None  # m / ‖W + s·B A‖ at merge time, for unmerge

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        super().create_adapter(dtype, device)
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=dtype, device=device))  # (m,)

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        super().init_from_base(weight, factors)
        if factors is not None:  # SVD-initialised DoRA: PiSSA's factors on the direction
            self.set_from_triplets(*factors)
        self.magnitude.copy_(torch.linalg.vector_norm(weight, dim=1))  # ‖W_i,:‖ of the original W

    # ----- the row norm from low-rank terms -------------------------------------------------------------
    @staticmethod
    def _identity(*tensors: torch.Tensor) -> tuple:
        """Changes when one of ``tensors`` is replaced (``.to()``, new storage) or modified in place by an
        autograd-visible op (``copy_``, merge): the key of the caches below."""
        return tuple((t.data_ptr(), t.device, t._version) for t in tensors)

    def _base_identity(self) -> tuple | None:
        """``_identity`` of the stored base weight — for a 4-bit base its packed codes, since every read of its
        ``weight`` dequantizes into a fresh tensor; ``None`` (nothing to key a cache on) for an FSDP shard."""
        stored = self.base_layer.packed if self.quantized else self.base_layer.weight
        return None if isinstance(stored, DTensor) else self._identity(stored)

    def _cached(self, slot: str, key: tuple | None, compute) -> torch.Tensor:
        if key is None or torch.compiler.is_compiling():
            # No key, or traced code: a lookup keyed on data pointers and version counters breaks the graph.
            return compute()
        entry = getattr(self, slot)
        # A value cached inside torch.inference_mode is an inference tensor: reused inside that mode only.
        if entry is not None and entry[0] == key and (torch.is_inference_mode_enabled() or not entry[1].is_inference()):
            return entry[1]
        value = compute()
        setattr(self, slot, (key, value))
        return value

    def _base_row_norms_sq(self, W: torch.Tensor) -> torch.Tensor:
        """``‖W_i‖²`` (m,) float32 of the frozen base weight ``W`` (its current value), computed once per base
        weight (version; for a 4-bit base, once per quantization, not once per dequantization)."""
        return self._cached(
            "_row_norms_sq",
            self._base_identity(),
            lambda: torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square(),
        )

    @torch.no_grad()
    def direction_norm(self, reuse: bool = False) -> torch.Tensor:
        """``‖W_base + s·B A‖`` per output row, (m,) float32, without forming the m×n matrix (detached).

        Args:
            reuse: Return the previous no-grad call's norm when ``W``, ``A`` and ``B`` are unchanged (the forward
                passes of evaluation and generation: one per new token). Forwards with gradients never reuse,
                and clear it: a fused optimizer step changes ``A``, ``B`` without bumping their version counters,
                and every step follows such a forward.
        """
        A, B = self.A, self.B
        if not reuse:
            self._norm = None
            return self._direction_norm(self.weight_matrix(), A, B)
        # The base is read (for a 4-bit base: dequantized) only when the cached norm is stale.
        base = self._base_identity()
        key = None if base is None else (*base, *self._identity(A, B), self.scaling)
        return self._cached("_norm", key, lambda: self._direction_norm(self.weight_matrix(), A, B))

    def _direction_norm(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        with torch.autocast(W.device.type, enabled=False):
            G = (W @ A.T.to(W.dtype)).float()  # (m, r): W Aᵀ, the one pass over W
            A, B = A.float(), B.float()
            s = self.scaling
            cross = (G * B).sum(1)  # ⟨W_i, (BA)_i⟩
            low_rank = ((B @ (A @ A.T)) * B).sum(1)  # ‖(BA)_i‖²
            squared = self._base_row_norms_sq(W) + (2 * s) * cross + (s * s) * low_rank
        return squared.clamp_min(0).sqrt()

    # ----- forward ---------------------------------------------------------------------------------------
    def _dora_output(self, x2d: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x2d`` (tokens, n) given the base layer's output ``result`` (tokens, m).

        ``g = m / ‖W_base + s·B A‖`` and ``h = result + (g − 1) ⊙ W x_d + g ⊙ s·B A x_d`` (PEFT's form), where
        ``x_d`` is the dropped-out input; without dropout ``W x_d = result − bias`` and h = g ⊙ (W x + s·B A x)
        + bias, which is what is computed (one (tokens, m) tensor saved for backward instead of two).
        """
        bias = self.base_layer.bias
        x_in = self.adapter_dropout(x2d)
        dropped = self.training and isinstance(self.adapter_dropout, nn.Dropout)
        if dropped:
            base = F.linear(x_in.to(result.dtype), self.weight_matrix().to(result.dtype))
        else:
            base = result if bias is None else result - bias
        adapter_dtype = self.A.dtype
        if x_in.dtype != adapter_dtype and not torch.is_autocast_enabled(x2d.device.type):
            x_in = x_in.to(adapter_dtype)
        low_rank = (x_in @ self.A.T) @ self.B.T  # (tokens, m), never an m×n matrix
        norm = self.direction_norm(reuse=not torch.is_grad_enabled())
        g = (self.magnitude / norm).to(result.dtype)  # the gradient reaches m only
        out = torch.add(base, low_rank.to(result.dtype), alpha=self.scaling) * g
        if dropped:
            return out + (result - base)
        return out if bias is None else out + bias

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base layer's output for ``x`` (..., n): ``(g − 1) ⊙ W x + g ⊙ s·B A x``."""
        x2d = x.reshape(-1, x.shape[-1])
        base = F.linear(x2d, self.weight_matrix())
        return (self._dora_output(x2d, base) - base).view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        result = self.base_layer(x2d)
        if not self.merged:
            result = self._dora_output(x2d, result)
        return result.view(*shape[:-1], result.shape[-1])

    # ----- merge -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``diag(m / ‖V‖_row) V`` with ``V = W_base + s·B A`` (float32, (m, n)); exact, the norm formed densely."""
        V = self.weight_matrix().float() + self.delta_weight()
        scale = self.magnitude.float() / torch.linalg.vector_norm(V, dim=1)
        self._merge_scale = scale  # unmerge divides by it: the merged rows no longer tell ‖V‖
        return scale[:, None] * V

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        if self._merge_scale is None:
            raise ValueError(f"DoRA layer '{self.layer_name}' has no merge record to unmerge from")
        return merged / self._merge_scale[:, None] - self.delta_weight()

    @torch.no_grad()
    def weight_change_norm(self) -> torch.Tensor:
        """``‖W'_t − W_0‖_F`` (0-dim float32) of the effective weight, from low-rank terms (monitoring).

        Row i of ``W'_t − W_0`` is ``(g_i − 1) W_i + s g_i (B A)_i − s (B_0 A_0)_i`` (``B_0 = 0`` for the LoRA
        init), a combination of ``W_i`` and the rows of ``[A; A_0]``; its norm needs ``W [A; A_0]ᵀ`` and one
        2r×2r Gram matrix.
        """
        # Under FSDP each rank takes the base rows it holds (the base is never gathered) and the row sums are
        # added across ranks; the factors are small and gathered whole.
        W, rows, group = row_shard(self.weight_matrix())
        f = self.factors()
        s, r = self.scaling, self.rank
        if self.decomposition is not None:
            f0 = self.factors(initial=True)
            A0, B0 = f0["A"], f0["B"][rows]
        else:
            A0, B0 = f["A"][:0], f["B"][rows, :0]
        stacked = torch.cat([f["A"], A0])  # (k, n)
        with torch.autocast(W.device.type, enabled=False):
            G = (W @ stacked.T.to(W.dtype)).float()  # (m, k): the one pass over W, shared with the norm below
        gram = stacked @ stacked.T  # (k, k); its first r×r block is A Aᵀ
        base_sq = self._base_row_norms_sq(W)  # of this rank's rows; not cached for a shard
        B = f["B"][rows]
        direction_sq = base_sq + 2 * s * (G[:, :r] * B).sum(1) + s * s * ((B @ gram[:r, :r]) * B).sum(1)
        g = f["magnitude"][rows] / direction_sq.clamp_min(0).sqrt()
        coeff = torch.cat([s * g[:, None] * B, -s * B0], dim=1)  # (m, k)
        c = g - 1
        squared = c.square() * base_sq + 2 * c * (G * coeff).sum(1) + ((coeff @ gram) * coeff).sum(1)
        total = squared.clamp_min(0).sum()
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        return total.sqrt()
