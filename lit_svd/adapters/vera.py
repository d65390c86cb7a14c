"""VeRA (Kopiczko et al., 2024, arXiv 2310.11454): frozen shared random projections, trained scaling vectors.

```
x ──┬── W (m×n, frozen) ─────────────────────────────────────────────────┐
    └── A (r×n, frozen, shared) ── ⊙ d (r) ── B (m×r, frozen, shared) ── ⊙ b (m) ── (+) ──> h
```

h = x Wᵀ + b ⊙ (B (d ⊙ (A x))), i.e. ΔW = diag(b) B diag(d) A. Init: ``b = 0`` (the model is unchanged),
``d = d_initial`` (0.1). Trainable per layer: ``r + m``. Merge: ``W += diag(b) B diag(d) A``.

``A`` and ``B`` are one pair for the whole model, as in PEFT's ``VeraModel``: ``A`` (r × n_max) and ``B``
(m_max × r) for the largest in/out sizes among the targeted layers, each layer using the slices
``A[:, :n]`` and ``B[:m, :]`` (so layers of one shape share the same matrices). They are drawn on the CPU
from ``torch.Generator().manual_seed(seed)`` by PEFT's Kaiming-uniform (bound √(6 / fan_in), A first, then
B), so ``seed`` equal to PEFT's ``projection_prng_key`` gives PEFT's very matrices. They are buffers that
checkpoints do not hold: ``inject_adapters`` re-derives them from the seed. No ``alpha``: ``b`` and ``d``
carry the scale.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from lit_svd.adapters.base import AdapterLayer, BaseLinear, Factors
from lit_svd.adapters.registry import register

__all__ = ["VeRALayer", "VeRAProjections", "shared_projection"]


def shared_projection(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) float32 CPU matrix, uniform on ±√(6 / cols) (Kaiming-uniform, fan-in = cols, gain √2),
    drawn from ``generator`` exactly as PEFT's ``vera.model._kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random ``A`` (r, n_max) and ``B`` (m_max, r) shared by a model's VeRA layers.

    Non-persistent buffers: a state dict never holds them; they are re-derived from ``seed``.
    """

    def __init__(
        self, rank: int, out_features: int, in_features: int, seed: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.seed = seed
        if torch.device(device).type == "meta":
            A, B = torch.empty(rank, in_features, device="meta"), torch.empty(out_features, rank, device="meta")
        else:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            A = shared_projection(rank, in_features, generator)
            B = shared_projection(out_features, rank, generator)
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, seed={self.seed}"


@register("vera")
class VeRALayer(AdapterLayer):
    """VeRA on one linear layer; the other arguments are ``AdapterLayer``'s (``scaling`` is 1: VeRA has no alpha).

    Args:
        base_layer: The ``nn.Linear`` / ``Conv1D`` to adapt (frozen).
        rank: Rank ``r`` of the shared projections.
        seed: Seed of the shared projections (``AdapterConfig.vera_seed``, PEFT's ``projection_prng_key``).
        d_initial: Initial value of ``d``'s entries (``AdapterConfig.vera_d_initial``, PEFT's ``d_initial``).
    """

    method = "vera"
    trainable_names = ("lambda_d", "lambda_b")
    monitored_vectors = ("lambda_d", "lambda_b")
    config_options = {"vera_seed": "seed", "vera_d_initial": "d_initial"}
    scaled = False
    trainable_formula = "r+m"

    def __init__(self, base_layer: BaseLinear, rank: int, *args, seed: int = 0, d_initial: float = 0.1, **kwargs):
        self.seed, self.d_initial = seed, d_initial  # read by create_adapter
        super().__init__(base_layer, rank, *args, **kwargs)
        # ``share_across`` hands every layer the model's pair; a layer built on its own draws a pair of its own
        # shape on first use (drawing one per layer here would cost seconds on a 7B model).
        self.register_module("projections", None)

    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        self.lambda_d = nn.Parameter(torch.full((self.rank,), self.d_initial, dtype=dtype, device=device))  # (r,)
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))  # (m,)

    @classmethod
    def share_across(cls, layers: list[AdapterLayer]) -> None:
        """Give every layer (per device) one pair sized to the largest in/out features, as PEFT does."""
        by_device: dict[torch.device, list[VeRALayer]] = defaultdict(list)
        for layer in layers:
            by_device[layer.lambda_d.device].append(layer)
        for device, group in by_device.items():
            first = group[0]
            if len({(layer.rank, layer.seed, layer.lambda_d.dtype) for layer in group}) > 1:
                raise ValueError("VeRA layers of one model must share rank, seed and adapter dtype")
            m = max(layer.out_features for layer in group)
            n = max(layer.in_features for layer in group)
            shared = VeRAProjections(first.rank, m, n, first.seed, first.lambda_d.dtype, device)
            for layer in group:
                layer.projections = shared

    def _projections(self) -> VeRAProjections:
        if self.projections is None:
            d = self.lambda_d
            self.projections = VeRAProjections(
                self.rank, self.out_features, self.in_features, self.seed, d.dtype, d.device
            )
        return self.projections

    @property
    def A(self) -> torch.Tensor:
        """The frozen projection ``A[:, :n]`` (r, n)."""
        return self._projections().A[:, : self.in_features]

    @property
    def B(self) -> torch.Tensor:
        """The frozen projection ``B[:m, :]`` (m, r)."""
        return self._projections().B[: self.out_features]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "A": self.A, "B": self.B}

    def factors(self, initial: bool = False) -> dict[str, torch.Tensor]:
        return {**super().factors(initial), "A": self.A.float(), "B": self.B.float()}

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        if self.lambda_d.is_meta or self.A.is_meta:
            raise ValueError(f"layer '{self.layer_name}' has meta tensors; materialise the model first")

    def low_rank_factors(self, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # diag(b) B diag(d): an (m, r) product per step, cheap next to the activations
        return t["lambda_b"][:, None] * t["B"] * t["lambda_d"], t["A"].T
