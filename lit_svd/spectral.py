"""Spectral health of trained adapters: singular-value drift, orthonormality, weight change.

Everything is computed from the low-rank factors (``P Qᵀ`` per layer, k ≤ 2r columns), never from the
m×n product, so monitoring stays cheap enough to leave on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lit_svd.adapters import AdapterLayer
from lit_svd.linalg import low_rank_frobenius_norm, low_rank_singular_values, orthonormality_error

__all__ = ["LayerSpectrum", "layer_spectrum", "layer_position"]

_POSITION = re.compile(r"(?:^|\.)(\d+)\.(?:.*\.)?([^.]+)$")


@dataclass
class LayerSpectrum:
    """Spectral metrics of one adapted layer at one step.

    Attributes:
        singular_values: Current singular values ``S_t`` (r,) of the adapter (SORSA/OSoRA: the trained
            ``S``; LoRA family: of ``s·B A`` via a thin SVD in r-dimensional space).
        sv_drift: ``‖S_t − S_0‖ / ‖S_0‖`` (``‖S_t‖ / ‖W_0‖_F`` when ``S_0 = 0``, i.e. LoRA).
        orth_U: ``‖UᵀU − I‖_F`` of the left singular factor (SORSA/OSoRA; 0 for the LoRA family, whose
            singular vectors are orthonormal by definition and not trained as such).
        orth_V: ``‖VᵀV − I‖_F`` of the right singular factor (likewise).
        weight_change: ``‖W_t − W_0‖_F / ‖W_0‖_F`` of the effective weight.
    """

    singular_values: torch.Tensor
    sv_drift: float
    orth_U: float
    orth_V: float
    weight_change: float


def layer_position(name: str) -> tuple[int, str]:
    """``(decoder layer index, module leaf name)`` from a dotted path; ``(-1, name)`` if it has no index."""
    match = _POSITION.search(name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


@torch.no_grad()
def original_weight_norm(layer: AdapterLayer) -> float:
    """``‖W_0‖_F`` of the weight before adaptation: residual plus the init-time delta."""
    P_0, Q_0 = layer.initial_low_rank_factors()
    return torch.linalg.norm(layer.weight_matrix().float() + P_0 @ Q_0.T).item()


@torch.no_grad()
def layer_spectrum(
    layer: AdapterLayer, weight_norm: float, initial_singular_values: torch.Tensor | None = None
) -> LayerSpectrum:
    """Spectral metrics of ``layer``.

    Args:
        layer: an adapted layer.
        weight_norm: its ``original_weight_norm`` (computed once per run).
        initial_singular_values: ``S_0`` of a LoRA-family layer if already known (it never changes, so
            callers that measure repeatedly cache it); computed when ``None``.
    """
    now = layer.factors()
    P_t, Q_t = layer.low_rank_factors(now)
    P_0, Q_0 = layer.initial_low_rank_factors()
    if "S" in layer.trainable_names:  # SORSA / OSoRA: the singular values are parameters
        S_t, S_0 = now["S"].double().cpu(), layer.factors(initial=True)["S"].double().cpu()
        orth = torch.stack([orthonormality_error(now["U"].float()), orthonormality_error(now["V"].float())]).cpu()
    else:
        S_t = low_rank_singular_values(P_t, Q_t)
        S_0 = low_rank_singular_values(P_0, Q_0) if initial_singular_values is None else initial_singular_values
        orth = torch.zeros(2)
    reference = torch.linalg.norm(S_0).item()
    drift = (
        torch.linalg.norm(S_t - S_0).item() / reference
        if reference > 0
        else torch.linalg.norm(S_t).item() / weight_norm
    )
    change = low_rank_frobenius_norm(torch.cat([P_t, -P_0], 1), torch.cat([Q_t, Q_0], 1)).item() / weight_norm
    return LayerSpectrum(
        singular_values=S_t.float(),
        sv_drift=drift,
        orth_U=float(orth[0]),
        orth_V=float(orth[1]),
        weight_change=change,
    )
