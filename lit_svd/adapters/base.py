"""The shared adapter layer: a frozen base linear layer plus a low-rank branch.

```
        x ──┬──────────── base_layer (W_base, frozen) ─────────────┐
            │                                                       (+)──> h
            └── dropout ── adapter_forward (low-rank, trainable) ──┘
```

A concrete method fills in three hooks, each a few lines:

- ``create_adapter(dtype, device)``: register its parameters/buffers with their shapes;
- ``init_from_base(weight, factors)``: set them from the original weight ``W`` (m, n) and its top-r
  factors (SVD ``(U, S, V)``, QR ``(Q_r, R_r)`` or ``None``), computed in batch by ``initialize_adapters``;
- ``low_rank_factors(tensors)``: ``(P (m, k), Q (n, k))`` with adapter delta ``P Qᵀ``. The forward pass
  (``h = x W_baseᵀ + (x Q) Pᵀ``, the second product accumulated in place into the first), merge, export,
  init and monitoring all derive from it; only merge/init ever form the dense (m, n) product.

The base class owns rank, scaling, dropout, the idempotent ``merge``/``unmerge``, and the residual
bookkeeping: methods whose init moves the principal part out of the base weight (``decomposition`` not
``None``) keep a snapshot ``init_<name>`` of each trainable tensor. The residual is always
``W − delta(snapshot)`` formed in float32, so the exact base weight is rebuilt from the *original*
checkpoint weights plus the adapter state dict, without storing any m×n matrix.

With ``base_quantization="nf4"`` the frozen base is quantized to 4 bits *after* the exact init (QLoRA for
LoRA, QPiSSA, QSORSA, … for the others; ``lit_svd.quantization``): the base layer becomes an ``NF4Linear``
and the full-precision weight is dropped. On load the residual is re-derived from the original weight and
quantized again, so the base is never stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lit_svd.linalg import full_tensor, residual_weight
from lit_svd.quantization import NF4Linear

__all__ = ["AdapterLayer", "BaseLinear", "default_adapter_dtype"]


BaseLinear = nn.Linear | Conv1D
Factors = tuple[torch.Tensor, ...] | None


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The adapter tensors' dtype when none is asked for: float32 next to a half-precision base, else the base's.

    Trained factors in bf16 lose the small updates fine-tuning makes: a singular value of 2.5 has a bf16
    spacing of 2^-6 ≈ 0.016, so AdamW steps of lr ≈ 1e-4 round away and S never moves (seen on a 7B-shaped
    SORSA run: singular-value drift exactly 0 after 40 steps). PEFT keeps LoRA weights in float32 beside a
    bf16 base for the same reason (``autocast_adapter_dtype``). The cost at 7B, r = 128: 0.6 GB more
    adapter plus 1.9 GB more gradient and AdamW state.
    """
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class AdapterLayer(nn.Module):
    """Base class of every adapter: wraps ``base_layer`` (``nn.Linear`` or GPT-2 ``Conv1D``).

    Args:
        base_layer: The layer to adapt; its weight is ``(out, in)`` for ``nn.Linear`` and ``(in, out)``
            for ``Conv1D``. It stays frozen.
        rank: Low-rank dimension ``r``.
        scaling: Multiplier ``s`` of the adapter delta (``alpha / r``).
        dropout: Dropout probability on the adapter input.
        adapter_dtype: Dtype of the adapter tensors; ``None``: ``default_adapter_dtype`` of the base weight's
            (float32 for a bf16/fp16 base).
        svd_method: Passed to ``linalg.top_r_svd`` by ``initialize_adapters``.
        name: Dotted path of the layer in the model, used in error messages.
        base_quantization: ``"nf4"``: quantize the frozen base to 4-bit NF4 right after init (and after each
            residual rebuild on load); ``None``: keep it in its own dtype.
        double_quantization: With ``"nf4"``, store the per-block scales in 8 bits (QLoRA's double quantization).
    """

    method: ClassVar[str] = ""
    #: Names of the trainable tensors (``nn.Parameter``) the method adds.
    trainable_names: ClassVar[tuple[str, ...]] = ()
    #: Names of frozen adapter buffers that are part of the adapter (e.g. OSoRA's singular vectors).
    frozen_names: ClassVar[tuple[str, ...]] = ()
    #: Factors whose orthonormality SORSA's regulariser penalises.
    orthonormal_names: ClassVar[tuple[str, ...]] = ()
    #: Which decomposition of ``W`` ``init_from_base`` consumes; ``None``: init leaves ``W`` unchanged;
    #: ``"calibrated"``: init moves a part of ``W`` computed from calibration data into the adapter;
    #: ``"loftq"``: LoftQ's alternating quantize / SVD, run inside ``init_from_base``. (DoRA sets it per
    #: instance: ``"svd"`` for its PiSSA-initialised variant.)
    decomposition: ClassVar[Literal["svd", "minor_svd", "qr", "calibrated", "loftq"] | None] = None
    #: The statistic of calibration data a data-aware method needs (``lit_svd.calibration``), else ``None``.
    calibration_statistic: ClassVar[Literal["corda", "eva", "gradient"] | None] = None
    #: Trained per-dimension vectors whose drift from init ``SpectralMonitor`` reports (DoRA's magnitude,
    #: VeRA's scaling vectors, OSoRA's output vector); each keeps an ``init_<name>`` snapshot.
    monitored_vectors: ClassVar[tuple[str, ...]] = ()
    #: ``AdapterConfig`` field → constructor keyword, for options only this method reads.
    config_options: ClassVar[dict[str, str]] = {}
    #: Whether ``alpha / r`` scales the delta (OSoRA and VeRA carry their scale in trained vectors).
    scaled: ClassVar[bool] = True
    #: Trainable count per layer in SPEC §3's notation (m = out, n = in features), shown by ``extra_repr``.
    trainable_formula: ClassVar[str] = ""

    def __init__(
        self,
        base_layer: BaseLinear,
        rank: int,
        scaling: float = 1.0,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype | None = None,
        svd_method: str = "auto",
        name: str = "",
        base_quantization: str | None = None,
        double_quantization: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_conv1d = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.is_conv1d else weight.shape
        if not 1 <= rank <= min(self.out_features, self.in_features):
            raise ValueError(
                f"rank {rank} is out of range for layer '{name}' of shape "
                f"({self.out_features}, {self.in_features}); it must be between 1 and "
                f"{min(self.out_features, self.in_features)}"
            )
        self.rank = rank
        self.scaling = scaling
        self.svd_method = svd_method
        self.layer_name = name
        self.base_quantization = base_quantization
        self.double_quantization = double_quantization
        self.merged = False
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A buffer, so checkpoints record that the residual was formed and resume never re-runs init.
        self.register_buffer("initialized", torch.tensor(False, device=weight.device))
        # What the calibration stage computed for a data-aware method's init; consumed (and freed) by it.
        self.calibration: Factors = None
        self.create_adapter(adapter_dtype or default_adapter_dtype(weight.dtype), weight.device)
        for tensor_name in self._snapshotted:
            self.register_buffer(f"init_{tensor_name}", torch.zeros_like(getattr(self, tensor_name)))

    # ----- hooks each method implements ---------------------------------------------------------------
    def create_adapter(self, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def init_from_base(self, weight: torch.Tensor, factors: Factors) -> None:
        raise NotImplementedError

    def low_rank_factors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank path ``(x Q) Pᵀ`` for ``x`` (..., n): an (..., k) intermediate, never m×n."""
        P, Q = self.low_rank_factors(self.tensors())
        return (x @ Q) @ P.mT

    @classmethod
    def share_across(cls, layers: list[AdapterLayer]) -> None:
        """Called by ``inject_adapters`` with every layer it created, for state the layers share (VeRA's
        random projections); default: nothing is shared."""

    # ----- shared machinery ---------------------------------------------------------------------------
    @property
    def _snapshotted(self) -> tuple[str, ...]:
        """Trainable tensors with an init-time snapshot ``init_<name>``: all of them when init moves the
        delta out of ``W`` (the residual is rebuilt from the snapshot), else the monitored vectors."""
        if self.decomposition is not None:
            return self.trainable_names
        return tuple(n for n in self.trainable_names if n in self.monitored_vectors)

    @property
    def adapter_tensor_names(self) -> tuple[str, ...]:
        """Every tensor an adapter checkpoint must hold for this layer."""
        snapshots = tuple(f"init_{n}" for n in self._snapshotted)
        return (*self.trainable_names, *self.frozen_names, *snapshots, "initialized")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Current adapter tensors by name, as stored (for the forward pass)."""
        return {n: getattr(self, n) for n in (*self.trainable_names, *self.frozen_names)}

    def factors(self, initial: bool = False) -> dict[str, torch.Tensor]:
        """Current (or, with ``initial``, init-time) adapter tensors by name, in float32.

        Tensors that FSDP shards are gathered whole (a collective: under FSDP every rank must call this).
        """
        out = {n: full_tensor(getattr(self, n)).float() for n in self.frozen_names}
        for n in self.trainable_names:
            source = f"init_{n}" if initial and self.decomposition is not None else n
            out[n] = full_tensor(getattr(self, source)).float()
        return out

    def initial_low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_0, Q_0)`` of the delta at init (zero for methods whose init leaves ``W`` unchanged)."""
        if self.decomposition is None:
            P, Q = self.low_rank_factors(self.factors())
            return torch.zeros_like(P), Q
        return self.low_rank_factors(self.factors(initial=True))

    def delta_weight(self, tensors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The dense ``(m, n)`` float32 change ``P Qᵀ`` (merge/init only; default: current tensors)."""
        P, Q = self.low_rank_factors(self.factors() if tensors is None else tensors)
        return P @ Q.T

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is held in 4 bits (``NF4Linear``)."""
        return isinstance(self.base_layer, NF4Linear)

    def weight_matrix(self) -> torch.Tensor:
        """The base weight as ``(out_features, in_features)`` (a view for ``Conv1D``; dequantized, a fresh
        tensor, for a 4-bit base)."""
        weight = self.base_layer.weight
        return weight.T if self.is_conv1d else weight

    def _write_weight_matrix(self, matrix: torch.Tensor) -> None:
        if self.quantized:
            raise ValueError(
                f"layer '{self.layer_name}' has a 4-bit (NF4) base, which cannot be changed in place; "
                "merge_adapters() / export_merged() write deq(base) + delta in full precision instead"
            )
        with torch.no_grad():
            self.base_layer.weight.copy_(matrix.T if self.is_conv1d else matrix)

    def frozen_residual(self, original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base weight init leaves, ``W − delta_0`` (``original`` (m, n), ``delta`` the init delta (m, n)).

        LoftQ overrides it: its base is the quantization of ``W`` minus the *previous* iteration's factors.
        """
        return residual_weight(original, delta)

    @torch.no_grad()
    def _quantize_base(self) -> None:
        """Replace the full-precision base layer by its NF4 quantization, where it lives (the init device)."""
        if self.base_quantization is None or self.quantized:
            return
        if self.base_quantization != "nf4":
            raise ValueError(f"unknown base_quantization {self.base_quantization!r} for layer '{self.layer_name}'")
        bias = getattr(self.base_layer, "bias", None)
        matrix = self.weight_matrix().detach()
        self.base_layer = NF4Linear.from_matrix(matrix, bias, self.is_conv1d, self.double_quantization)

    @torch.no_grad()
    def initialize(self, factors: Factors = None) -> float:
        """Set the adapter from the base weight and move its delta out of the base weight.

        Returns:
            Relative reconstruction error ``‖W_base + delta − W‖_F / ‖W‖_F`` in float32.
        """
        return self.initialize_without_sync(factors).item()

    @torch.no_grad()
    def initialize_without_sync(self, factors: Factors = None) -> torch.Tensor:
        """``initialize`` returning the error as a 0-dim device tensor (no wait for the device)."""
        weight = self.weight_matrix()
        if weight.is_meta:
            raise ValueError(f"layer '{self.layer_name}' has meta weights; load real weights before init")
        original = weight.detach().clone()
        work = original.double() if original.dtype == torch.float64 else original.float()
        self.init_from_base(work, factors)
        # Right after init the snapshot equals the current tensors, so one dense delta serves both the
        # residual and the reconstruction check.
        delta = self.delta_weight()
        for n in self._snapshotted:
            getattr(self, f"init_{n}").copy_(getattr(self, n))
        if self.decomposition is not None:
            self._write_weight_matrix(self.frozen_residual(original, delta))
        self.initialized.fill_(True)
        self.calibration = None  # no calibration state outlives the init (nor carries into another fit)
        # With a 4-bit base the error reported is the model's as it will train: deq(Q(W_res)) + delta vs W.
        self._quantize_base()
        rebuilt = self.weight_matrix().float() + delta
        return torch.linalg.norm(rebuilt - original.float()) / torch.linalg.norm(original.float())

    @torch.no_grad()
    def rebuild_residual(self) -> None:
        """Turn an *original* base weight into the residual recorded by the init snapshot (on load), and
        quantize it again when the base is 4-bit (the same arithmetic as at init, so the same codes)."""
        if self.decomposition is not None:
            original = self.weight_matrix().detach().clone()
            self._write_weight_matrix(self.frozen_residual(original, self.delta_weight(self.factors(initial=True))))
        self.initialized.fill_(True)
        self._quantize_base()

    def weight_change_norm(self) -> torch.Tensor | None:
        """``‖W_t − W_0‖_F`` (0-dim) for methods whose effective weight is not ``W_base + P Qᵀ`` (DoRA);
        ``None``: monitoring derives it from the low-rank factors."""
        return None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The ``(m, n)`` float32 weight the adapted layer applies: ``W_base + delta`` (merge/export only)."""
        return self.weight_matrix().float() + self.delta_weight()

    @torch.no_grad()
    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """``W_base`` (float32) back from the ``merged`` weight ``merged_weight`` produced."""
        return merged - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter delta into the base weight (idempotent)."""
        if self.merged:
            return
        self._refuse_quantized("merge")
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(f"adapter of layer '{self.layer_name}' has non-finite values; refusing to merge")
        self._write_weight_matrix(merged.to(self.base_layer.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter delta from the base weight again (idempotent)."""
        if not self.merged:
            return
        self._refuse_quantized("unmerge")
        base = self.unmerged_weight(self.weight_matrix().float())
        self._write_weight_matrix(base.to(self.base_layer.weight.dtype))
        self.merged = False

    def _refuse_quantized(self, what: str) -> None:
        if self.quantized:
            raise ValueError(
                f"cannot {what} the adapter of layer '{self.layer_name}' into its 4-bit (NF4) base: the sum "
                "would be rounded to 4 bits again; merge_adapters(model) or export_merged() give the merged "
                "model in full precision (deq(base) + delta)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # 2-D input makes the base output a fresh tensor, so the adapter term can be accumulated into it
        # in place by one GEMM (no extra (tokens, m) temporaries or casts).
        x2d = x.reshape(-1, shape[-1])
        result = self.base_layer(x2d)
        if not self.merged:
            adapter_dtype = getattr(self, self.trainable_names[0]).dtype
            x_in = self.adapter_dropout(x2d)
            if x_in.dtype != adapter_dtype and not torch.is_autocast_enabled(x.device.type):
                x_in = x_in.to(adapter_dtype)
            P, Q = self.low_rank_factors(self.tensors())
            result.addmm_((x_in @ Q).to(result.dtype), P.to(result.dtype).mT)
        return result.view(*shape[:-1], result.shape[-1])

    def extra_repr(self) -> str:
        count = sum(getattr(self, n).numel() for n in self.trainable_names)
        formula = f"{self.trainable_formula}=" if self.trainable_formula else ""
        return (
            f"method={self.method}, in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, trainable={formula}{count}, merged={self.merged}"
            + (f", base_quantization={self.base_quantization}" if self.base_quantization else "")
        )
