"""Spectral metrics from low-rank factors against the same quantities computed on dense m×n matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_svd import AdapterConfig, adapter_layers, inject_adapters
from lit_svd.linalg import low_rank_singular_values, orthonormality_error
from lit_svd.spectral import layer_spectrum, original_weight_norm


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
