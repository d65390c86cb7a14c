"""Parity with Hugging Face PEFT for the three methods it also implements (LoRA, PiSSA, OLoRA)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import TOLERANCE, make_tiny_model

from lit_svd import AdapterConfig, adapter_layers, inject_adapters

PEFT_INIT = {"lora": True, "pissa": "pissa", "olora": "olora"}
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def build_pair(method: str, rank: int = 4, alpha: float | None = None):
    base = make_tiny_model("llama")
    ours = inject_adapters(
        copy.deepcopy(base), AdapterConfig(method=method, rank=rank, alpha=alpha, target_modules=TARGETS)
    )
    peft_config = peft.LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=TARGETS, init_lora_weights=PEFT_INIT[method]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    return base, ours, theirs


def peft_layer(theirs, name: str):
    return theirs.base_model.model.get_submodule(name)


def align_signs(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Flip columns of ``ours`` (d, r) to the sign of ``theirs``: SVD/QR factors are unique up to sign."""
    signs = torch.sign((ours * theirs).sum(0))
    return ours * signs


@pytest.mark.parametrize("method", ["lora", "pissa", "olora"])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_same_base_weight_factors_and_outputs(method, alpha, input_ids):
    base, ours, theirs = build_pair(method, alpha=alpha)
    tol = TOLERANCE[torch.float32]
    for name, layer in adapter_layers(ours):
        other = peft_layer(theirs, name)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=0, atol=tol)
        A_theirs, B_theirs = other.lora_A["default"].weight, other.lora_B["default"].weight
        assert layer.scaling == pytest.approx(other.scaling["default"])
        if method == "lora":
            assert torch.equal(layer.B, torch.zeros_like(layer.B)) and torch.equal(B_theirs, torch.zeros_like(B_theirs))
            assert layer.A.shape == A_theirs.shape
        else:
            torch.testing.assert_close(align_signs(layer.B, B_theirs), B_theirs, rtol=0, atol=tol)
            torch.testing.assert_close(align_signs(layer.A.T, A_theirs.T).T, A_theirs, rtol=0, atol=tol)
        # the adapted weight W_base + s·B A
        ours_w = layer.base_layer.weight + layer.delta_weight()
        theirs_w = other.base_layer.weight + other.scaling["default"] * B_theirs @ A_theirs
        torch.testing.assert_close(ours_w, theirs_w, rtol=0, atol=tol)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["lora", "pissa", "olora"])
def test_same_outputs_with_trained_factors(method, input_ids):
    """Copying our (perturbed) factors into PEFT gives identical logits: same forward and scaling."""
    _, ours, theirs = build_pair(method, alpha=8.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            layer.A.add_(0.1 * torch.randn(layer.A.shape, generator=g))
            layer.B.add_(0.1 * torch.randn(layer.B.shape, generator=g))
            other = peft_layer(theirs, name)
            other.base_layer.weight.copy_(layer.base_layer.weight)
            other.lora_A["default"].weight.copy_(layer.A)
            other.lora_B["default"].weight.copy_(layer.B)
        torch.testing.assert_close(
            ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=TOLERANCE[torch.float32]
        )
