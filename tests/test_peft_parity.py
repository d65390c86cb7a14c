"""Parity with Hugging Face PEFT: LoRA, PiSSA, OLoRA, and CorDA, EVA, LoRA-GA from the same calibration batches."""

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


def peft_factors(other) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``A`` (r, n) and ``B`` (m, r) of one LoRA layer."""
    return other.lora_A["default"].weight, other.lora_B["default"].weight


def assert_same_factors_up_to_sign(layer, other, tol: float) -> None:
    A_theirs, B_theirs = peft_factors(other)
    torch.testing.assert_close(align_signs(layer.B, B_theirs), B_theirs, rtol=0, atol=tol)
    torch.testing.assert_close(align_signs(layer.A.T, A_theirs.T).T, A_theirs, rtol=0, atol=tol)


def assert_same_adapted_weight(layer, other, tol: float) -> None:
    """Each side's base weight plus its own ``s·B A`` agree."""
    A_theirs, B_theirs = peft_factors(other)
    ours_w = layer.base_layer.weight + layer.delta_weight()
    theirs_w = other.base_layer.weight + other.scaling["default"] * B_theirs @ A_theirs
    torch.testing.assert_close(ours_w, theirs_w, rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["lora", "pissa", "olora"])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_same_base_weight_factors_and_outputs(method, alpha, input_ids):
    base, ours, theirs = build_pair(method, alpha=alpha)
    tol = TOLERANCE[torch.float32]
    for name, layer in adapter_layers(ours):
        other = peft_layer(theirs, name)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=0, atol=tol)
        A_theirs, B_theirs = peft_factors(other)
        assert layer.scaling == pytest.approx(other.scaling["default"])
        if method == "lora":
            assert torch.equal(layer.B, torch.zeros_like(layer.B)) and torch.equal(B_theirs, torch.zeros_like(B_theirs))
            assert layer.A.shape == A_theirs.shape
        else:
            assert_same_factors_up_to_sign(layer, other, tol)
        assert_same_adapted_weight(layer, other, tol)  # W_base + s·B A
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


# ----- data-aware inits: same calibration batches → same factors (PEFT's preprocess_corda / EVA) ----------------
def calibration_batches(shape: tuple[int, int], count: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(0, 101, shape, generator=g)} for _ in range(count)]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode, input_ids):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from lit_svd.calibration import calibrate

    # PEFT's covariance hook takes one sequence per forward (it squeezes the batch dimension): batches of 1.
    batches = calibration_batches((1, 24), 4)
    base = make_tiny_model("llama")
    ours = inject_adapters(
        copy.deepcopy(base), AdapterConfig(method="corda", rank=4, target_modules=TARGETS, corda_mode=mode), False
    )
    calibrate(ours, batches)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    theirs = copy.deepcopy(base)
    preprocess_corda(theirs, config, run_model=lambda: [theirs(b["input_ids"]) for b in batches])
    theirs = peft.get_peft_model(theirs, config)
    tol = TOLERANCE[torch.float32]  # measured: factors 2.6e-6 (IPM) / 1.3e-5 (KPM), logits 3e-6
    for name, layer in adapter_layers(ours):
        other = peft_layer(theirs, name)
        assert_same_factors_up_to_sign(layer, other, tol)
        torch.testing.assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=0, atol=tol)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=tol)


@pytest.mark.parametrize(("rho", "min_overlap"), [(1.0, 0.85), (2.0, 0.9999)])
def test_eva_matches_peft(rho, min_overlap, input_ids):
    from peft import EvaConfig, initialize_lora_eva_weights

    from lit_svd.calibration import calibrate

    batches = calibration_batches((4, 32), 1)
    base = make_tiny_model("llama")
    ours = inject_adapters(
        copy.deepcopy(base), AdapterConfig(method="eva", rank=4, target_modules=TARGETS, eva_rho=rho), False
    )
    ranks = calibrate(ours, batches)["eva_ranks"]
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=rho)
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    # Same rank redistribution (PEFT records only the ranks that differ from r) …
    assert theirs.peft_config["default"].rank_pattern == {n: k for n, k in ranks.items() if k != 4}
    for name, layer in adapter_layers(ours):
        A_theirs = peft_layer(theirs, name).lora_A["default"].weight
        k = A_theirs.shape[0]
        assert k == ranks[name]
        # … and the same directions up to sign: PEFT's incremental randomized PCA (torch.svd_lowrank with
        # q = 2ρr oversampled vectors, stopped when consecutive estimates agree) approximates the exact PCA we
        # take; with ρ = 1 (q = 2r) its last directions are rough (measured: overlap 0.886, q_proj),
        # with ρ = 2 they agree to 1e-5. Compared: the leading direction and the subspace overlap ‖A Âᵀ‖²_F / k.
        first = torch.nn.functional.cosine_similarity(layer.A[:1], A_theirs[:1]).abs().item()
        overlap = (layer.A[:k] @ A_theirs.T).square().sum().item() / k
        assert first > 0.999 and overlap > min_overlap, (name, first, overlap)
    with torch.no_grad():  # B = 0 on both sides: both reproduce the base model
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=0)


def test_loraga_matches_peft(input_ids):
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from lit_svd.calibration import calibrate

    batches = calibration_batches((2, 16), 3)
    base = make_tiny_model("llama")  # no dropout: PEFT estimates the gradient in train mode, we in eval mode
    ours = inject_adapters(copy.deepcopy(base), AdapterConfig(method="loraga", rank=4, target_modules=TARGETS), False)
    calibrate(ours, batches)
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
    )
    theirs = copy.deepcopy(base)

    def train_step() -> None:
        for batch in batches:
            theirs(**batch, labels=batch["input_ids"]).loss.backward()

    with pytest.warns(UserWarning, match="Full backward hook"):  # PEFT's own hook, on frozen inputs
        preprocess_loraga(theirs, config, train_step)
    theirs = peft.get_peft_model(theirs, config)
    tol = TOLERANCE[torch.float32]
    for name, layer in adapter_layers(ours):
        other = peft_layer(theirs, name)
        # A's rows (V_{:r}) and B's columns (U_{r:2r}) come from different triplets: signs are independent, and
        # PEFT's randomized torch.svd_lowrank (q = 4r, 4 iterations) estimates them (measured: 7e-5 here).
        assert_same_factors_up_to_sign(layer, other, tol)
        assert_same_adapted_weight(layer, other, tol)  # each side's residual + s·B A: the original weight
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=tol)
