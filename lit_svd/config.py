"""`AdapterConfig`: which adapter to put where, with what rank — one typed dataclass for all methods."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lit_svd.adapters import available_adapters
from lit_svd.quantization import QUANTIZATIONS

__all__ = ["AdapterConfig"]

_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class AdapterConfig:
    """Hyper-parameters of an SVD-family adapter (SPEC §3).

    Attributes:
        method: Registered adapter name (``lit_svd.adapters.available_adapters()``): ``lora`` (Hu et al.
            2021), ``pissa`` (Meng et al. 2024), ``olora`` (Büyükakyüz 2024, QR init), ``sorsa`` (Cao
            2024, singular values + orthonormally regularised singular vectors), ``osora`` (Han et al.
            2025, singular values + output vector), ``milora`` (Wang et al. 2024, minor singular triplets),
            ``dora`` (Liu et al. 2024, magnitude + LoRA direction), ``vera`` (Kopiczko et al. 2024, frozen
            shared random projections + trained scaling vectors); data-aware, initialised from calibration
            batches inside ``fit`` (``SVDInit``): ``corda`` (Yang et al. 2024), ``eva`` (Paischer et al. 2024),
            ``loraga`` (Wang et al. 2024).
        rank: Number of singular triplets / low-rank dimension ``r``.
        alpha: Scale numerator: the adapter delta is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``). ``None`` means ``alpha = r``, i.e. a scale of 1, the papers' setting.
        use_rslora: Use rank-stabilised scaling ``alpha / sqrt(r)`` (PEFT's ``use_rslora``).
        target_modules: Which linear layers to adapt: a list of module names (matched against the last
            component of the dotted module path or the whole path), a regular expression matched against
            the full path with ``re.fullmatch``, or ``"all-linear"`` for every linear layer except the
            output embedding (``lm_head``).
        dropout: Dropout probability on the adapter's input (PEFT's ``lora_dropout``).
        gamma: SORSA orthonormal-regulariser strength γ; the step applies (γ/η_t)·L_orth after clipping.
            ``0`` disables the regulariser.
        adapter_dtype: Storage dtype of the adapter tensors; ``None``: float32 beside a bf16/fp16 base (bf16
            factors lose fine-tuning's small updates; ``lit_svd.adapters.base.default_adapter_dtype``), else
            the base layer's dtype. ``"bfloat16"`` saves memory at that risk.
        svd_method: How the top-r SVD is computed at init (see ``lit_svd.linalg.top_r_svd``): ``"auto"``,
            ``"subspace"`` (Chebyshev-filtered subspace iteration, the fast exact path for r ≪ min(m, n)),
            ``"gram"`` (full Gram eigendecomposition + float64 Rayleigh–Ritz) or ``"full"`` (``torch.linalg.svd``).
        dora_init: DoRA only: how the direction's ``B``, ``A`` start: ``"lora"`` (A Kaiming, B = 0, the paper's
            and PEFT's default) or ``"pissa"`` (the principal singular triplets, with the residual as the frozen
            base: PEFT's ``use_dora=True, init_lora_weights="pissa"``). The magnitude starts at ``W``'s row norms
            either way.
        vera_seed: VeRA only: seed of the shared frozen random projections (PEFT's ``projection_prng_key``);
            they are re-derived from it on load, never stored.
        vera_d_initial: VeRA only: initial value of every entry of the scaling vector ``d`` (PEFT's
            ``d_initial``; the paper's Table 8 uses 0.1).
        corda_mode: CorDA's mode: ``"ipm"`` (instruction-previewed: the adapter takes the r largest
            components of ``W C``) or ``"kpm"`` (knowledge-preserving: the r smallest).
        eva_rho: EVA's rank redistribution ρ >= 1: a layer may get up to ``round(ρ r)`` components, ``r ×
            layers`` in all, by explained variance; ``1`` keeps ``r`` per layer.
        base_quantization: ``"nf4"``: after the exact full-precision init, quantize the frozen base (the
            residual; ``W`` itself for LoRA, i.e. QLoRA) to 4-bit NormalFloat with bitsandbytes' blockwise
            quantizer (docs/quantization.md). ``None``: keep the base in the model's dtype.
        double_quantization: With ``base_quantization``, also quantize the per-block scales to 8 bits
            (QLoRA's double quantization; 0.38 bits per weight less, no measurable error change).
        loftq_iters: LoftQ's number of alternating quantize / rank-r SVD steps (PEFT's ``loftq_iter``,
            default 1). Used by ``method="loftq"`` only.
    """

    method: str = "sorsa"
    rank: int = 16
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dropout: float = 0.0
    gamma: float = 4e-4
    adapter_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    svd_method: Literal["auto", "subspace", "gram", "full"] = "auto"
    dora_init: Literal["lora", "pissa"] = "lora"
    vera_seed: int = 0
    vera_d_initial: float = 0.1
    corda_mode: Literal["ipm", "kpm"] = "ipm"
    eva_rho: float = 1.0
    # A str, not a Literal: a wrong name then reaches __post_init__, whose message lists the choices (the CLI's
    # type check would bury it in a Union error).
    base_quantization: str | None = None
    double_quantization: bool = True
    loftq_iters: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.method not in available_adapters():
            problems.append(f"unknown adapter {self.method!r}; choose one of: {', '.join(available_adapters())}")
        if self.method in ("osora", "vera") and self.alpha is not None:
            carrier = "output vector carries" if self.method == "osora" else "vectors b and d carry"
            problems.append(f"alpha has no effect for {self.method} (its {carrier} the scale); leave it None")
        if self.dora_init not in ("lora", "pissa"):
            problems.append(f"dora_init must be 'lora' or 'pissa', got {self.dora_init!r}")
        elif self.dora_init != "lora" and self.method != "dora":
            problems.append(f"dora_init={self.dora_init!r} applies to method 'dora' only, not {self.method!r}")
        if (self.vera_seed, self.vera_d_initial) != (0, 0.1) and self.method != "vera":
            problems.append(f"vera_seed and vera_d_initial apply to method 'vera' only, not {self.method!r}")
        if not isinstance(self.vera_seed, int) or isinstance(self.vera_seed, bool) or self.vera_seed < 0:
            problems.append(f"vera_seed must be a non-negative integer, got {self.vera_seed!r}")
        if not math.isfinite(self.vera_d_initial) or self.vera_d_initial == 0:
            problems.append(
                f"vera_d_initial must be finite and non-zero (d = b = 0 has zero gradient), got {self.vera_d_initial!r}"
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"alpha must be positive or None (= rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.gamma >= 0.0:
            problems.append(f"gamma must be >= 0 (0 disables the SORSA regulariser), got {self.gamma!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            problems.append(f"adapter_dtype must be one of {', '.join(_DTYPES)} or None, got {self.adapter_dtype!r}")
        if self.svd_method not in ("auto", "subspace", "gram", "full"):
            problems.append(f"svd_method must be one of auto, subspace, gram, full; got {self.svd_method!r}")
        if self.corda_mode not in ("ipm", "kpm"):
            problems.append(f"corda_mode must be 'ipm' or 'kpm', got {self.corda_mode!r}")
        if not self.eva_rho >= 1.0:
            problems.append(f"eva_rho must be >= 1 (1: no rank redistribution), got {self.eva_rho!r}")
        if self.base_quantization is not None and self.base_quantization not in QUANTIZATIONS:
            problems.append(
                f"unknown base_quantization {self.base_quantization!r}; choose one of: {', '.join(QUANTIZATIONS)} "
                "(or None for a full-precision base)"
            )
        if self.method == "loftq" and self.base_quantization is None:
            problems.append("method 'loftq' fits its factors to a quantized base: set base_quantization='nf4'")
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 1:
            problems.append(f"loftq_iters must be a positive integer, got {self.loftq_iters!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    problems.append(f"target_modules {self.target_modules!r} is not a valid regex: {err}")
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            problems.append(
                f"target_modules must be a non-empty list of names, a regex or 'all-linear', "
                f"got {self.target_modules!r}"
            )
        if problems:
            raise ValueError("invalid AdapterConfig:\n  - " + "\n  - ".join(problems))

    @property
    def layer_rank(self) -> int:
        """Rows each adapter layer holds: ``rank``, or ``round(eva_rho · rank)`` for EVA's redistribution."""
        return round(self.eva_rho * self.rank) if self.method == "eva" else self.rank

    @property
    def scaling(self) -> float:
        """The multiplier ``s`` of the adapter delta."""
        alpha = float(self.rank) if self.alpha is None else float(self.alpha)
        return alpha / (self.rank**0.5 if self.use_rslora else self.rank)
