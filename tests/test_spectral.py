"""Spectral metrics from low-rank factors against the same quantities computed on dense m×n matrices."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny_model
from torch import nn

from lit_svd import AdapterConfig, adapter_layers, inject_adapters
from lit_svd.callbacks import SpectralMonitor
from lit_svd.linalg import (
    frobenius_norm_from_grams,
    low_rank_grams,
    low_rank_singular_values,
    orthonormality_error,
    singular_values_from_grams,
)
from lit_svd.spectral import layer_spectra, layer_spectrum, original_weight_norm


def test_low_rank_singular_values_match_dense_including_rank_deficient():
    P = torch.randn(2, 30, 6, dtype=torch.float64)
    Q = torch.randn(2, 20, 6, dtype=torch.float64)
    torch.testing.assert_close(
        low_rank_singular_values(P, Q), torch.linalg.svdvals(P @ Q.mT)[:, :6], rtol=1e-9, atol=1e-12
    )
    P[:, :, 3:] = 0  # rank 3: Cholesky-based formulas would fail here
    S = low_rank_singular_values(P, Q)
    torch.testing.assert_close(S[:, :3], torch.linalg.svdvals(P @ Q.mT)[:, :3], rtol=1e-9, atol=1e-12)
    assert S[:, 3:].abs().max() < 1e-6
    assert low_rank_singular_values(torch.zeros(8, 4), torch.randn(5, 4)).abs().max() == 0


@pytest.mark.parametrize("method", ["lora", "pissa", "sorsa", "osora"])
def test_layer_spectrum_equals_dense_computation(method):
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(24, 40, bias=False))
    W_0 = holder[0].weight.detach().double().clone()
    inject_adapters(holder, AdapterConfig(method=method, rank=4, target_modules=["0"], adapter_dtype="float32"))
    ((_, layer),) = adapter_layers(holder)
    with torch.no_grad():  # "training": move every trainable tensor
        for name in layer.trainable_names:
            getattr(layer, name).add_(0.05 * torch.randn_like(getattr(layer, name)))
    spectrum = layer_spectrum(layer, original_weight_norm(layer))
    W_t = layer.weight_matrix().double() + layer.delta_weight().double()
    norm_0 = torch.linalg.matrix_norm(W_0)
    torch.testing.assert_close(
        torch.tensor(spectrum.weight_change, dtype=torch.float64),
        torch.linalg.matrix_norm(W_t - W_0) / norm_0,
        # the dense side carries the fp32 rounding of the stored residual; the factor side does not
        rtol=1e-4,
        atol=1e-7,
    )
    if method in ("sorsa", "osora"):
        torch.testing.assert_close(spectrum.singular_values, layer.S.detach().float())
        expected = orthonormality_error(layer.U.double()).item()
        assert spectrum.orth_U == pytest.approx(expected, rel=1e-4, abs=1e-6)
        if method == "sorsa":  # U is trained: the perturbation broke orthonormality and the metric sees it
            assert spectrum.orth_U > 1e-3
    else:
        dense_S = torch.linalg.svdvals(layer.delta_weight().double())[:4]
        torch.testing.assert_close(spectrum.singular_values.double(), dense_S, rtol=1e-5, atol=1e-7)
        assert spectrum.orth_U == 0.0 and spectrum.orth_V == 0.0
    if method == "lora":  # S_0 = 0: drift is measured against ‖W_0‖
        expected = torch.linalg.vector_norm(spectrum.singular_values.double()) / norm_0
        assert spectrum.sv_drift == pytest.approx(expected.item(), rel=1e-5)


def test_singular_values_and_norm_from_grams_on_a_batch_mixing_definite_and_singular():
    g = torch.Generator().manual_seed(3)
    P = torch.randn(2, 3, 30, 6, generator=g, dtype=torch.float64)
    Q = torch.randn(2, 3, 20, 6, generator=g, dtype=torch.float64)
    P[0, 1, :, 2:] = 0  # rank 2: its Cholesky fails, the eigh square root takes over for it alone
    P[1, 2] = 0  # LoRA at init: B = 0
    gram_P, gram_Q = low_rank_grams(P.float(), Q.float())
    assert gram_P.dtype == torch.float64 and gram_P.shape == (2, 3, 6, 6)
    gram_P, gram_Q = low_rank_grams(P, Q)
    S = singular_values_from_grams(gram_P, gram_Q)
    dense = torch.linalg.svdvals(P @ Q.mT)[..., :6]
    torch.testing.assert_close(S, dense, rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(S[0, 0], dense[0, 0], rtol=1e-9, atol=0)
    assert S[1, 2].abs().max() == 0
    torch.testing.assert_close(
        frobenius_norm_from_grams(gram_P, gram_Q), torch.linalg.matrix_norm(P @ Q.mT), rtol=1e-12, atol=1e-12
    )


METHODS = ["lora", "pissa", "olora", "sorsa", "osora"]


def mixed_model(arch: str, methods: list[str], rank: int = 4) -> nn.Module:
    """One decoder block per method (every projection of it adapted), trained-like factors: mixed shapes/kinds."""
    holder = nn.ModuleList()
    for seed, method in enumerate(methods):
        model = make_tiny_model(arch, seed=seed)
        block = model.model.layers[0] if arch == "llama" else model.transformer.h[0]
        config = AdapterConfig(method=method, rank=rank, target_modules=TINY_TARGETS[arch], adapter_dtype="float32")
        holder.append(inject_adapters(block, config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(holder):
            for name in layer.trainable_names:
                tensor = getattr(layer, name)
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return holder


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("methods", [[m] for m in METHODS] + [METHODS], ids=[*METHODS, "all"])
def test_layer_spectra_batched_equal_per_layer_and_dense(arch, methods):
    layers = dict(adapter_layers(mixed_model(arch, methods)))
    weight_norms: dict[str, float] = {}
    initial: dict[str, torch.Tensor] = {}
    spectra = layer_spectra(layers, weight_norms, initial)
    assert list(spectra) == list(layers) and set(weight_norms) == set(initial) == set(layers)
    for name, layer in layers.items():
        batched, single = spectra[name], layer_spectrum(layer, original_weight_norm(layer))
        assert weight_norms[name] == pytest.approx(original_weight_norm(layer), rel=1e-6)
        torch.testing.assert_close(batched.singular_values, single.singular_values, rtol=1e-6, atol=1e-7)
        for metric in ("sv_drift", "orth_U", "orth_V", "weight_change"):
            assert getattr(batched, metric) == pytest.approx(getattr(single, metric), rel=1e-6, abs=1e-9), metric
        # and both equal the quantities formed densely in float64 from the same factors
        P_t, Q_t = (x.double() for x in layer.low_rank_factors(layer.factors()))
        P_0, Q_0 = (x.double() for x in layer.initial_low_rank_factors())
        norm_0 = torch.linalg.matrix_norm(layer.weight_matrix().double() + P_0 @ Q_0.T)
        change = torch.linalg.matrix_norm(P_t @ Q_t.T - P_0 @ Q_0.T) / norm_0
        assert batched.weight_change == pytest.approx(change.item(), rel=1e-5)
        if "S" in layer.trainable_names:
            torch.testing.assert_close(batched.singular_values, layer.S.detach().float())
            S_0 = layer.init_S.double()
            for metric, factor in (("orth_U", layer.U), ("orth_V", layer.V)):
                expected = orthonormality_error(factor.detach().double()).item()
                assert getattr(batched, metric) == pytest.approx(expected, rel=1e-3, abs=1e-6), metric
        else:
            dense_S = torch.linalg.svdvals(P_t @ Q_t.T)[: layer.rank]
            torch.testing.assert_close(batched.singular_values.double(), dense_S, rtol=1e-5, atol=1e-7)
            S_0 = torch.linalg.svdvals(P_0 @ Q_0.T)[: layer.rank]
            assert batched.orth_U == batched.orth_V == 0.0
        torch.testing.assert_close(initial[name], S_0, rtol=1e-6, atol=1e-7)
        S_t, reference = batched.singular_values.double(), S_0.norm()
        drift = (S_t - S_0).norm() / reference if reference > 0 else S_t.norm() / norm_0
        assert batched.sv_drift == pytest.approx(drift.item(), rel=1e-5)
    # a second call served from the caches gives the same numbers
    again = layer_spectra(layers, weight_norms, initial)
    for name in layers:
        assert again[name].weight_change == spectra[name].weight_change
        assert again[name].sv_drift == spectra[name].sv_drift


def test_monitor_measure_moves_results_to_the_host_once(monkeypatch):
    holder = mixed_model("llama", METHODS)
    monitor = SpectralMonitor()
    calls = {"cpu": 0, "item": 0}
    for method in calls:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    monitor.measure(holder)  # first call of a run: also measures the weight norms and S_0, still one transfer
    assert calls["cpu"] == 1
    calls.update(cpu=0, item=0)
    spectra = monitor.measure(holder)
    assert calls == {"cpu": 1, "item": 0}
    monkeypatch.undo()
    for name, layer in adapter_layers(holder):
        single = layer_spectrum(layer, original_weight_norm(layer))
        assert spectra[name].weight_change == pytest.approx(single.weight_change, rel=1e-6)
        assert spectra[name].sv_drift == pytest.approx(single.sv_drift, rel=1e-6, abs=1e-12)


def test_layer_spectrum_of_lora_at_init_is_zero():
    holder = nn.Sequential(nn.Linear(24, 40, bias=False))
    inject_adapters(holder, AdapterConfig(method="lora", rank=4, target_modules=["0"], adapter_dtype="float32"))
    ((_, layer),) = adapter_layers(holder)
    spectrum = layer_spectrum(layer, original_weight_norm(layer))
    assert spectrum.singular_values.abs().max() == 0
    assert spectrum.sv_drift == spectrum.weight_change == 0.0
