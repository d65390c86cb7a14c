"""The contract every registered adapter keeps, on tiny Llama, Qwen2 and GPT-2 (Conv1D) models."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    TINY_ARCHS,
    TOLERANCE,
    adapted,
    logits,
    make_tiny_model,
    perturb,
)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from lit_svd import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    available_adapters,
    inject_adapters,
    load_adapter_state_dict,
    merge_adapters,
    orthonormal_regularizer,
)
from lit_svd.linalg import orthonormality_error

# LoftQ fits its factors to a 4-bit base, so it cannot keep the full-precision contract (logits preserved at
# init, in-place merge); tests/test_quantization.py holds it and every method with a 4-bit base to theirs.
METHODS = tuple(m for m in available_adapters() if m != "loftq")


def expected_trainable(method: str, m: int, n: int, r: int) -> int:
    """SPEC §3's per-layer formulas."""
    per_layer = {"lora": r * (m + n), "pissa": r * (m + n), "milora": r * (m + n), "olora": r * (m + n)}
    per_layer |= {"corda": r * (m + n), "eva": r * (m + n), "loraga": r * (m + n)}
    return (per_layer | {"sorsa": r * (m + n + 1), "osora": r + m, "dora": r * (m + n) + m, "vera": r + m})[method]


def test_registry_lists_the_methods():
    assert available_adapters() == (
        "corda", "dora", "eva", "loftq", "lora", "loraga", "milora", "olora", "osora", "pissa", "sorsa", "vera"
    )  # fmt: skip


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_init_preserves_logits(arch, method, input_ids):
    base = make_tiny_model(arch)
    reference = logits(base, input_ids)
    model = adapted(arch, method)
    diff = (logits(model, input_ids) - reference).abs().max().item()
    assert diff < TOLERANCE[torch.float32], f"{method}/{arch}: max |Δlogit| = {diff:.2e}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_matches_formula_and_only_adapters_train(arch, method):
    model = adapted(arch, method, rank=3)
    layers = list(adapter_layers(model))
    assert len(layers) == {"llama": 14, "qwen2": 14, "gpt2": 8}[arch]  # GPT-2 has c_proj in attn and mlp
    expected = sum(expected_trainable(method, lay.out_features, lay.in_features, 3) for _, lay in layers)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    allowed = {f"{n}.{t}" for n, lay in layers for t in lay.trainable_names}
    assert set(trainable) == allowed
    for _, lay in layers:  # extra_repr states the formula and the count (SORSA-style)
        count = expected_trainable(method, lay.out_features, lay.in_features, 3)
        assert f"trainable={lay.trainable_formula}={count}" in repr(lay), repr(lay)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_round_trip_and_idempotence(arch, method, input_ids):
    model = adapted(arch, method)
    perturb(model)
    unmerged = logits(model, input_ids)
    for _, layer in adapter_layers(model):
        layer.merge()
        layer.merge()  # idempotent
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=0, atol=TOLERANCE[torch.float32])
    for _, layer in adapter_layers(model):
        layer.unmerge()
        layer.unmerge()
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=0, atol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_perturbing_factors_changes_logits(arch, method, input_ids):
    model = adapted(arch, method)
    before = logits(model, input_ids)
    perturb(model)
    assert (logits(model, input_ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_state_dict_rebuilds_the_model_from_original_weights(arch, method, input_ids):
    model = adapted(arch, method)
    perturb(model)
    trained = logits(model, input_ids)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert not any("base_layer" in k for k in state)
    fresh = make_tiny_model(arch)  # original weights again
    inject_adapters(fresh, model.lit_svd_config, initialize=False)
    load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, input_ids), trained, rtol=0, atol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_adapters_save_pretrained_from_pretrained(arch, method, input_ids, tmp_path):
    model = adapted(arch, method)
    perturb(model)
    trained = logits(model, input_ids)
    merged = merge_adapters(model)
    assert not list(adapter_layers(merged))
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, input_ids), trained, rtol=0, atol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_training_step_changes_only_adapter_parameters(arch, method, input_ids):
    model = adapted(arch, method).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
            assert p.grad is None
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of an input (DoRA's F.linear transposes W) forms nothing: only new storage is recorded.
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("method", METHODS)
def test_adapter_forward_and_backward_never_form_an_m_by_n_matrix(method):
    model = adapted("llama", method, rank=4)
    layer = dict(adapter_layers(model))["model.layers.0.mlp.gate_proj"]  # m=48, n=32
    x = torch.randn(3, 5, layer.in_features)
    with _ShapeRecorder() as recorder:
        layer.adapter_forward(x).sum().backward()
    mn = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    assert not [s for s in recorder.shapes if s[-2:] in mn], recorder.shapes


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sorsa_factors_orthonormal_at_init(arch):
    model = adapted(arch, "sorsa")
    for _, layer in adapter_layers(model):
        assert orthonormality_error(layer.U.double()) < 1e-5
        assert orthonormality_error(layer.V.double()) < 1e-5


def test_orthonormal_regularizer_value_and_gradient_flow():
    model = adapted("llama", "sorsa", rank=2)
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.U.zero_()
            layer.U[0, 0] = 1.5 + 0.1 * i
            layer.U[1, 1] = 0.5  # UᵀU − I = diag((1.5+0.1i)² − 1, −0.75)
            layer.V.zero_()
            layer.V[:2, :2] = torch.eye(2) * 2.0  # VᵀV − I = 3·I → ‖·‖_F = 3√2
    expected = []
    for i in range(len(layers)):
        expected.append((((1.5 + 0.1 * i) ** 2 - 1) ** 2 + 0.75**2) ** 0.5)
        expected.append(3 * 2**0.5)
    loss = orthonormal_regularizer(model)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    loss.backward()
    for n, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == (n.endswith(".U") or n.endswith(".V")), n


def test_orthonormal_regularizer_is_zero_without_sorsa():
    model = adapted("llama", "pissa")
    value = orthonormal_regularizer(model)
    assert value.item() == 0.0 and not value.requires_grad


def test_adapter_dtype_keeps_factors_in_float32_on_a_bfloat16_model(input_ids):
    model = make_tiny_model("llama").to(torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj"], adapter_dtype="float32"))
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.U.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(("asked", "expected"), [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_adapters_beside_a_bfloat16_base_default_to_float32_so_small_updates_survive(asked, expected):
    # A singular value near 2.5 has a bf16 spacing of 2^-6: an AdamW step of 1e-4 rounds away in bf16 and
    # S never moves (a 7B-shaped SORSA run on GPUs showed drift exactly 0); in float32 it moves.
    model = make_tiny_model("llama").to(torch.bfloat16)
    config = AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj"], adapter_dtype=asked)
    inject_adapters(model, config)
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.S.dtype == expected and layer.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.S.fill_(2.5)
    before = layer.S.detach().clone()
    optimizer = torch.optim.AdamW([layer.S], lr=1e-4, weight_decay=0.0)
    layer.S.grad = torch.ones_like(layer.S)
    optimizer.step()
    moved = (layer.S.detach().float() - before.float()).abs().max().item()
    if expected == torch.float32:
        assert moved == pytest.approx(1e-4, rel=1e-2)  # float32 spacing at 2.5: 2.4e-7
    else:
        assert moved == 0.0  # the reason for the float32 default
