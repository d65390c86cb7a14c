"""Spectral health of trained adapters: singular-value drift, orthonormality, weight change.

Everything is computed from the low-rank factors (``P Qᵀ`` per layer, k ≤ 2r columns), never from the
m×n product, so monitoring stays cheap enough to leave on. ``layer_spectra`` measures a whole model at
once: layers of one kind and shape are stacked and reduced by batched GEMMs on their device to a few k×k
Gram matrices and scalars per layer, all of which reach the CPU in a single transfer; the k×k
eigenproblems are then solved there, batched, in float64.

```
  L same-shape layers, stacked       device: batched GEMMs, no sync           CPU, float64, batched
  P_t, Q_t (L, m, k), (L, n, k) ──> PᵀP, QᵀQ (L, k, k)        (LoRA family) ─┐   σ(P_t Q_tᵀ): eigvalsh
  P_0, Q_0 (init snapshot)      ──> ‖P_t Q_tᵀ − P_0 Q_0ᵀ‖_F (L,)            ├─> drift, weight change
  S, U, V (SORSA/OSoRA)         ──> S (L, k), ‖UᵀU − I‖, ‖VᵀV − I‖ (L, 2) ──┘   one .cpu() for all
```
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lit_svd.adapters import AdapterLayer
from lit_svd.linalg import (
    frobenius_norm_from_grams,
    full_tensor,
    low_rank_difference_norm,
    low_rank_frobenius_norm,
    low_rank_grams,
    orthonormality_error,
    singular_values_from_grams,
)

__all__ = ["LayerSpectrum", "layer_spectrum", "layer_spectra", "layer_position", "original_weight_norm"]

_POSITION = re.compile(r"(?:^|\.)(\d+)\.(?:.*\.)?([^.]+)$")


@dataclass
class LayerSpectrum:
    """Spectral metrics of one adapted layer at one step.

    Attributes:
        singular_values: Current singular values ``S_t`` (r,) of the adapter (SORSA/OSoRA: the trained
            ``S``; LoRA family: of ``s·B A``, from its two r×r Gram matrices).
        sv_drift: ``‖S_t − S_0‖ / ‖S_0‖`` (``‖S_t‖ / ‖W_0‖_F`` when ``S_0 = 0``, i.e. LoRA).
        orth_U: ``‖UᵀU − I‖_F`` of the left singular factor (SORSA/OSoRA; 0 for the LoRA family, whose
            singular vectors are orthonormal by definition and not trained as such).
        orth_V: ``‖VᵀV − I‖_F`` of the right singular factor (likewise).
        weight_change: ``‖W_t − W_0‖_F / ‖W_0‖_F`` of the effective weight (DoRA: with its magnitude).
        vector_drift: For each trained per-dimension vector ``v`` of the method (``monitored_vectors``: DoRA's
            ``magnitude``, VeRA's ``lambda_d`` and ``lambda_b``, OSoRA's ``output_scale``), ``‖v_t − v_0‖ /
            ‖v_0‖``; for a vector that starts at 0 (VeRA's ``lambda_b``), its RMS ``‖v_t‖ / √len``.
    """

    singular_values: torch.Tensor
    sv_drift: float
    orth_U: float
    orth_V: float
    weight_change: float
    vector_drift: dict[str, float] = field(default_factory=dict)


def layer_position(name: str) -> tuple[int, str]:
    """``(decoder layer index, module leaf name)`` from a dotted path; ``(-1, name)`` if it has no index."""
    match = _POSITION.search(name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name)


def _weight_norm(layer: AdapterLayer) -> torch.Tensor:
    """``‖W_0‖_F`` as a 0-dim float32 tensor on the layer's device (no synchronisation).

    Under FSDP the weight is gathered whole (one matrix, once per run: ``SpectralMonitor`` caches the norm,
    and takes it from ``SVDInit`` when the init measured it before sharding).
    """
    weight = full_tensor(layer.weight_matrix()).float()
    if layer.decomposition is None:  # init left W unchanged: the base weight is W_0
        return torch.linalg.vector_norm(weight)
    P_0, Q_0 = layer.initial_low_rank_factors()
    return torch.linalg.vector_norm(weight + P_0 @ Q_0.T)


@torch.no_grad()
def original_weight_norm(layer: AdapterLayer) -> float:
    """``‖W_0‖_F`` of the weight before adaptation: residual plus the init-time delta."""
    return _weight_norm(layer).item()


def _trains_singular_values(layer: AdapterLayer) -> bool:
    return "S" in layer.trainable_names  # SORSA / OSoRA: the singular values are parameters


def _group_key(layer: AdapterLayer) -> tuple:
    """Layers with equal keys have factors of equal shapes and the same metrics: they are stacked."""
    device = getattr(layer, layer.trainable_names[0]).device
    return (
        type(layer),
        _trains_singular_values(layer),
        layer.decomposition is None,
        layer.out_features,
        layer.in_features,
        layer.rank,
        device,
    )


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; transposed views (LoRA's ``Q = Aᵀ``) are stacked as their contiguous transposes."""
    if all(t.dim() == 2 and t.mT.is_contiguous() and not t.is_contiguous() for t in tensors):
        return torch.stack([t.mT for t in tensors]).mT  # a plain copy instead of a transposing one
    return torch.stack(tensors)


class _Stacker:
    """``_stack`` that stacks each distinct list of tensors once: OSoRA's frozen ``V`` is ``Q_t``, ``Q_0`` and
    the factor checked for orthonormality at once. The inputs are kept, so that their ``id`` stays theirs."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(map(id, tensors))
        if key not in self._done:
            self._done[key] = (tensors, _stack(tensors))
        return self._done[key][1]


def _group_on_device(layers: list[AdapterLayer], with_initial: bool) -> dict[str, torch.Tensor]:
    """The small tensors the metrics of a group of same-kind, same-shape layers need, left on their device.

    Keys: ``change`` (L,) ``‖W_t − W_0‖_F``; SORSA/OSoRA: ``S_t`` (L, k), ``orth`` (L, 2) and, with
    ``with_initial``, ``S_0`` (L, k); LoRA family: ``gram_P``/``gram_Q`` (L, k, k) float64 of the current
    delta and, with ``with_initial`` and an init that moved ``W`` (PiSSA, OLoRA), ``gram_P0``/``gram_Q0``.
    """
    first, stack = layers[0], _Stacker()
    now = [layer.factors() for layer in layers]
    pairs = [layer.low_rank_factors(f) for layer, f in zip(layers, now, strict=True)]
    P_t, Q_t = stack([P for P, _ in pairs]), stack([Q for _, Q in pairs])
    out = {}
    if _trains_singular_values(first):
        out["S_t"] = stack([f["S"] for f in now])
        U, V = stack([f["U"] for f in now]), stack([f["V"] for f in now])
        out["orth"] = torch.stack([orthonormality_error(U), orthonormality_error(V)], -1)
        if with_initial:
            out["S_0"] = stack([layer.factors(initial=True)["S"] for layer in layers])
    else:
        out["gram_P"], out["gram_Q"] = low_rank_grams(P_t, Q_t)
    if first.decomposition is None:  # init left W unchanged: the change is the current delta itself
        out["change"] = (
            frobenius_norm_from_grams(out["gram_P"], out["gram_Q"])
            if "gram_P" in out
            else low_rank_frobenius_norm(P_t, Q_t)
        )
    else:
        initial_pairs = [layer.initial_low_rank_factors() for layer in layers]
        P_0, Q_0 = stack([P for P, _ in initial_pairs]), stack([Q for _, Q in initial_pairs])
        out["change"] = low_rank_difference_norm(P_t, Q_t, P_0, Q_0)
        if with_initial and "gram_P" in out:
            out["gram_P0"], out["gram_Q0"] = low_rank_grams(P_0, Q_0)
    exact = [layer.weight_change_norm() for layer in layers]
    if exact[0] is not None:  # DoRA: the magnitude rescales rows, so the change is not P_t Q_tᵀ − P_0 Q_0ᵀ
        out["change"] = torch.stack(exact).to(out["change"].device)
    for name in first.monitored_vectors:
        v_t = stack([f[name] for f in now])
        v_0 = stack([full_tensor(getattr(layer, f"init_{name}")).float() for layer in layers])
        size = torch.full((len(layers),), float(v_t.shape[-1]), device=v_t.device)
        norms = [torch.linalg.vector_norm(v_t - v_0, dim=-1), torch.linalg.vector_norm(v_0, dim=-1), size]
        out[f"vector:{name}"] = torch.stack(norms, -1)  # (L, 3)
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float64 CPU copies of ``tensors``, moved in one transfer per device (one in total on one GPU)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        by_device[tensor.device].append(index)
    host: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).double() for i in indices]).cpu()
        for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices]), strict=True):
            host[i] = piece.view(tensors[i].shape)
    return host


@torch.no_grad()
def layer_spectra(
    layers: Mapping[str, AdapterLayer],
    weight_norms: dict[str, float] | None = None,
    initial_singular_values: dict[str, torch.Tensor] | None = None,
) -> dict[str, LayerSpectrum]:
    """Spectral metrics of many layers at once, batched over layers of equal kind and shape.

    The device work is a few batched GEMMs per group of same-shape layers and no synchronisation until
    all results move to the CPU together; the singular values of the LoRA family are then computed there,
    batched, in float64 (``singular_values_from_grams``). Equal to ``layer_spectrum`` layer by layer.

    Args:
        layers: Adapted layers by name (e.g. ``dict(adapter_layers(model))``); the result keeps this order.
        weight_norms: Cache of each layer's ``‖W_0‖_F``; missing entries are measured (once per run is
            enough: it never changes, and it is the only part that reads the m×n weights) and added.
        initial_singular_values: Cache of each layer's ``S_0`` (k,) float64; missing entries are measured
            and added (it never changes either).

    Returns:
        ``LayerSpectrum`` by layer name.
    """
    weight_norms = {} if weight_norms is None else weight_norms
    initial = {} if initial_singular_values is None else initial_singular_values
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        groups[_group_key(layer)].append(name)

    on_device = [
        _group_on_device([layers[n] for n in names], with_initial=any(n not in initial for n in names))
        for names in groups.values()
    ]
    missing_norms = [n for n in layers if n not in weight_norms]
    pending = [t for group in on_device for t in group.values()] + [_weight_norm(layers[n]) for n in missing_norms]
    host = iter(_to_host(pending))  # the only synchronisation
    on_host = [{key: next(host) for key in group} for group in on_device]
    weight_norms.update((n, next(host).item()) for n in missing_norms)

    spectra: dict[str, LayerSpectrum] = {}
    for names, values in zip(groups.values(), on_host, strict=True):
        if "S_t" in values:
            S_t, orth = values["S_t"], values["orth"]
        else:
            S_t = singular_values_from_grams(values["gram_P"], values["gram_Q"])
            orth = torch.zeros(len(names), 2, dtype=torch.float64)
        if any(n not in initial for n in names):
            if "S_0" in values:
                S_0 = values["S_0"]
            elif "gram_P0" in values:
                S_0 = singular_values_from_grams(values["gram_P0"], values["gram_Q0"])
            else:  # LoRA: the delta starts at zero
                S_0 = torch.zeros_like(S_t)
            for name, S in zip(names, S_0, strict=True):
                initial.setdefault(name, S.clone())
        S_0 = torch.stack([initial[n] for n in names]).double()
        norms = torch.tensor([weight_norms[n] for n in names], dtype=torch.float64)
        reference = torch.linalg.vector_norm(S_0, dim=-1)
        drift = torch.where(
            reference > 0,
            torch.linalg.vector_norm(S_t - S_0, dim=-1) / reference,
            torch.linalg.vector_norm(S_t, dim=-1) / norms,
        )
        change = values["change"] / norms
        vectors = {}
        for key in (k for k in values if k.startswith("vector:")):
            moved, start, size = values[key].unbind(-1)
            vectors[key.removeprefix("vector:")] = torch.where(start > 0, moved / start, moved / size.sqrt()).tolist()
        rows = zip(names, S_t, drift.tolist(), orth.tolist(), change.tolist(), strict=True)
        for i, (name, S, d, (o_U, o_V), c) in enumerate(rows):
            spectra[name] = LayerSpectrum(
                S.float(),
                sv_drift=d,
                orth_U=o_U,
                orth_V=o_V,
                weight_change=c,
                vector_drift={v: drifts[i] for v, drifts in vectors.items()},
            )
    return {name: spectra[name] for name in layers}


def layer_spectrum(
    layer: AdapterLayer, weight_norm: float, initial_singular_values: torch.Tensor | None = None
) -> LayerSpectrum:
    """Spectral metrics of ``layer`` (``layer_spectra`` for a single layer).

    Args:
        layer: an adapted layer.
        weight_norm: its ``original_weight_norm`` (computed once per run).
        initial_singular_values: ``S_0`` of the layer if already known (it never changes, so callers that
            measure repeatedly cache it); computed when ``None``.
    """
    initial = {} if initial_singular_values is None else {"layer": initial_singular_values}
    return layer_spectra({"layer": layer}, {"layer": weight_norm}, initial)["layer"]
