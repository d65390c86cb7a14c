"""MiLoRA: the minor singular triplets, exact on real weights, and how it differs from PEFT's MiCA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from test_smollm2_exactness import real_layers

from lit_svd import AdapterConfig, adapter_layers, inject_adapters
from lit_svd.linalg import bottom_r_svd, orthonormality_error


def _spectrum(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.logspace(0, -3, k, dtype=torch.float64)  # a wide spectrum: the bottom is 1000x below the top
    return (U[:, :k] * S) @ V[:, :k].T


@pytest.mark.parametrize(("m", "n"), [(48, 32), (32, 48)])
def test_bottom_r_svd_returns_the_smallest_triplets(m, n):
    W = _spectrum(m, n)
    U, S, V = bottom_r_svd(W.float(), 5)
    reference = torch.linalg.svdvals(W)[-5:]
    torch.testing.assert_close(S.double(), reference, rtol=1e-4, atol=0)
    assert torch.all(S[:-1] >= S[1:])  # descending, as top_r_svd
    assert orthonormality_error(U) < 1e-5 and orthonormality_error(V) < 1e-5
    # U diag(S) Vᵀ is the part of W along those directions
    torch.testing.assert_close((U.double().T @ W @ V.double()).diagonal(), S.double(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="rank r=33 must be between 1 and min"):
        bottom_r_svd(W, 33)


def test_milora_starts_at_the_minor_part_and_keeps_the_principal_part_frozen():
    model = make_tiny_model("llama")
    originals = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    inject_adapters(model, AdapterConfig(method="milora", rank=3, target_modules=["q_proj"]))
    for name, layer in adapter_layers(model):
        W = originals[name]
        S_all = torch.linalg.svdvals(W)
        delta = layer.delta_weight().double()
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:3], S_all[-3:], rtol=1e-4, atol=1e-7)
        # what stays frozen is W's best rank-(k−3) approximation: its distance to W is the bottom 3 σ's
        residual_gap = torch.linalg.matrix_norm(W - layer.base_layer.weight.double())
        torch.testing.assert_close(residual_gap, S_all[-3:].norm(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.base_layer.weight.double() + delta, W, rtol=0, atol=1e-5)


def test_mica_in_peft_starts_b_in_the_same_subspace_but_is_another_method():
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("llama")
    ours = inject_adapters(copy.deepcopy(base), AdapterConfig(method="milora", rank=3, target_modules=["q_proj"]))
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"], init_lora_weights="mica")
    )
    layer = dict(adapter_layers(ours))["model.layers.0.self_attn.q_proj"]
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    mica_B = peft_layer.lora_B["default"].weight.double()  # (m, r): the minor left singular vectors
    ours_B = layer.B.double()  # U_min √S_min

    def projector(basis):
        q, _ = torch.linalg.qr(basis)
        return q @ q.T

    assert (projector(mica_B) - projector(ours_B)).abs().max() < 1e-5  # the same subspace
    # ...but MiCA starts with A = 0, a frozen B and W untouched; MiLoRA moves the minor part out of W
    assert (
        peft_layer.lora_A["default"].weight.abs().max() == 0 and not peft_layer.lora_B["default"].weight.requires_grad
    )
    assert layer.A.abs().max() > 0 and layer.B.requires_grad
    assert not torch.equal(layer.base_layer.weight, peft_layer.base_layer.weight)


@pytest.mark.slow
def test_milora_is_exact_at_the_bottom_of_smollm2_spectra(smollm2):
    holder = real_layers(smollm2)
    originals = {n: m.weight.detach().double().clone() for n, m in holder.named_children()}
    inject_adapters(holder, AdapterConfig(method="milora", rank=16, target_modules="all-linear"))
    worst_sv, worst_gap = 0.0, 0.0
    for name, layer in adapter_layers(holder):
        W = originals[name]
        S_all = torch.linalg.svdvals(W)
        S = torch.linalg.svdvals(layer.delta_weight().double())[:16]
        worst_sv = max(worst_sv, ((S - S_all[-16:]).abs() / S_all[-16:]).max().item())
        gap = torch.linalg.matrix_norm(W - layer.base_layer.weight.double())
        worst_gap = max(worst_gap, (gap / S_all[-16:].norm() - 1).abs().item())
    print(f"MiLoRA r=16 on SmolLM2: max rel σ error {worst_sv:.2e}, max residual-gap error {worst_gap:.2e}")
    assert worst_sv < 1e-4 and worst_gap < 1e-4
