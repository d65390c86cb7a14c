"""DoRA: the low-rank row norm, parity with PEFT's ``use_dora=True`` (outputs and gradients), the SVD init,
exact merge, PEFT DoRA export, checkpoints and the magnitude curve."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import TOLERANCE, make_tiny_model
from transformers import AutoModelForCausalLM

from lit_svd import AdapterConfig, adapter_layers, adapter_state_dict, inject_adapters, load_adapter_state_dict
from lit_svd.export import export_merged, export_peft_lora
from lit_svd.spectral import layer_spectra

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
TOL = TOLERANCE[torch.float32]


def dora(model, rank: int = 4, alpha: float | None = 8.0, **kwargs):
    config = AdapterConfig(method="dora", rank=rank, alpha=alpha, target_modules=TARGETS, **kwargs)
    return inject_adapters(model, config)


def perturb(model, seed: int = 5, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for t in (layer.A, layer.B, layer.magnitude):
                t.add_(scale * torch.randn(t.shape, generator=g))


def peft_pair(init: str = "lora"):
    """Ours and PEFT's DoRA on the same tiny Llama, with PEFT's random ``lora_A`` copied into ours."""
    base = make_tiny_model("llama")
    ours = dora(copy.deepcopy(base), dora_init=init)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=True if init == "lora" else init
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return base, ours, theirs


def peft_tensors(theirs, name: str) -> dict[str, torch.Tensor]:
    layer = theirs.base_model.model.get_submodule(name)
    return {
        "A": layer.lora_A["default"].weight,
        "B": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
        "base": layer.base_layer.weight,
    }


def copy_tensors(ours, theirs, to_peft: bool) -> None:
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            other = peft_tensors(theirs, name)
            for key in ("A", "B", "magnitude"):
                source, target = (getattr(layer, key), other[key]) if to_peft else (other[key], getattr(layer, key))
                target.copy_(source)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_norm_from_low_rank_terms_equals_the_formed_weight(arch):
    model = make_tiny_model(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else TARGETS  # GPT-2: Conv1D, the weight stored transposed
    inject_adapters(model, AdapterConfig(method="dora", rank=5, alpha=12.0, target_modules=targets))
    perturb(model, scale=0.5)
    for name, layer in adapter_layers(model):
        V = layer.weight_matrix().double() + layer.scaling * layer.B.double() @ layer.A.double()
        expected = torch.linalg.vector_norm(V, dim=1)
        torch.testing.assert_close(layer.direction_norm().double(), expected, rtol=1e-5, atol=0, msg=name)


def test_cached_base_row_norms_follow_the_weight():
    model = dora(make_tiny_model("llama"))
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    before = layer.direction_norm().clone()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)  # B = 0 at init: the norm is ‖W_i‖, so it doubles
    torch.testing.assert_close(layer.direction_norm(), 2 * before, rtol=1e-6, atol=0)


@pytest.mark.parametrize("direction", ["to_peft", "from_peft"])
def test_peft_parity_of_outputs_and_gradients(direction, input_ids):
    """Same base weights; equal logits at init and with trained tensors copied either way; equal gradients,
    which pins PEFT's convention that the row norm is a constant in backward (paper §4.3)."""
    base, ours, theirs = peft_pair()
    copy_tensors(ours, theirs, to_peft=False)  # PEFT's Kaiming A (B = 0 in both)
    for name, layer in adapter_layers(ours):
        other = peft_tensors(theirs, name)
        assert torch.equal(layer.base_layer.weight, other["base"])
        torch.testing.assert_close(layer.magnitude, other["magnitude"], rtol=0, atol=1e-6)  # ‖W_i,:‖
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, base(input_ids).logits, rtol=0, atol=TOL)
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=TOL)
    if direction == "to_peft":
        perturb(ours, seed=7)
    else:  # train-like change on PEFT's side, then copied into ours
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, _ in adapter_layers(ours):
                for key, t in peft_tensors(theirs, name).items():
                    if key != "base":
                        t.add_(0.1 * torch.randn(t.shape, generator=g))
    copy_tensors(ours, theirs, to_peft=direction == "to_peft")
    ours_out, theirs_out = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, rtol=0, atol=TOL)
    assert (ours_out.logits - base(input_ids).logits).abs().max() > 1e-2  # the copied tensors matter
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in adapter_layers(ours):
        other = peft_tensors(theirs, name)
        for key in ("A", "B", "magnitude"):
            grad = getattr(layer, key).grad
            assert grad is not None and grad.abs().max() > 0, f"{name}.{key} gets no gradient"
            torch.testing.assert_close(grad, other[key].grad, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")


def test_svd_initialised_dora_matches_peft_pissa_dora(input_ids):
    """``dora_init="pissa"``: principal factors on the direction, residual as base, magnitude = ‖W_i,:‖."""
    base, ours, theirs = peft_pair("pissa")
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    for name, layer in adapter_layers(ours):
        other = peft_tensors(theirs, name)
        assert layer.decomposition == "svd" and layer.B.abs().max() > 0
        torch.testing.assert_close(layer.base_layer.weight, other["base"], rtol=0, atol=TOL)
        torch.testing.assert_close(layer.magnitude, other["magnitude"], rtol=0, atol=TOL)
        torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(originals[name], dim=1), rtol=1e-6, atol=0)
        signs = torch.sign((layer.B * other["B"]).sum(0))  # SVD factors are unique up to sign
        torch.testing.assert_close(layer.B * signs, other["B"], rtol=0, atol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, base(input_ids).logits, rtol=0, atol=TOL)
        perturb(ours)
        copy_tensors(ours, theirs, to_peft=True)
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_merge_is_exact_and_keeps_the_magnitude(init, input_ids):
    model = dora(make_tiny_model("llama"), dora_init=init)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.magnitude.mul_(1.5)  # the magnitude alone: a merge that dropped it would be caught here
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids).logits
    for name, layer in adapter_layers(model):
        V = layer.weight_matrix().double() + layer.scaling * layer.B.double() @ layer.A.double()
        expected = (layer.magnitude.double() / torch.linalg.vector_norm(V, dim=1))[:, None] * V
        torch.testing.assert_close(layer.merged_weight().double(), expected, rtol=0, atol=1e-5, msg=name)
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, trained, rtol=0, atol=TOL)


@pytest.mark.parametrize(("arch", "init"), [("llama", "lora"), ("llama", "pissa"), ("gpt2", "lora")])
def test_exports_merged_and_as_a_peft_dora_adapter(arch, init, input_ids, tmp_path):
    base = make_tiny_model(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else TARGETS  # GPT-2: Conv1D, PEFT's fan_in_fan_out
    model = inject_adapters(
        copy.deepcopy(base), AdapterConfig(method="dora", rank=4, alpha=8.0, target_modules=targets, dora_init=init)
    )
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids).logits
    export_merged(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    export_peft_lora(model, tmp_path / "peft")
    config = peft.PeftConfig.from_pretrained(tmp_path / "peft")
    assert config.use_dora and config.r == (4 if init == "lora" else 8)  # ΔW against the original W: rank ≤ 2r
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, trained, rtol=0, atol=TOL)
        torch.testing.assert_close(served(input_ids).logits, trained, rtol=0, atol=TOL)


def test_svd_initialised_state_dict_rebuilds_the_model_from_original_weights(input_ids):
    model = dora(make_tiny_model("llama"), dora_init="pissa")
    perturb(model)
    with torch.no_grad():
        trained = model(input_ids).logits
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert {k.rsplit(".", 1)[-1] for k in state} == {
        "A", "B", "magnitude", "init_A", "init_B", "init_magnitude", "initialized"
    }  # fmt: skip
    fresh = make_tiny_model("llama")
    inject_adapters(fresh, model.lit_svd_config, initialize=False)
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids).logits, trained)


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_monitor_reports_magnitude_drift_and_the_true_weight_change(init):
    base = make_tiny_model("llama")
    model = dora(copy.deepcopy(base), dora_init=init)
    originals = {n: m.weight.detach().double() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    start = {n: layer.magnitude.detach().clone() for n, layer in adapter_layers(model)}
    spectra = layer_spectra(dict(adapter_layers(model)))
    assert all(s.vector_drift == {"magnitude": 0.0} and s.weight_change < 1e-6 for s in spectra.values())
    perturb(model)
    spectra = layer_spectra(dict(adapter_layers(model)))
    for name, layer in adapter_layers(model):
        m_0 = start[name]
        drift = (torch.linalg.vector_norm(layer.magnitude - m_0) / torch.linalg.vector_norm(m_0)).item()
        assert spectra[name].vector_drift["magnitude"] == pytest.approx(drift, rel=1e-5)
        W_0 = originals[name]
        change = torch.linalg.matrix_norm(layer.merged_weight().double() - W_0) / torch.linalg.matrix_norm(W_0)
        assert spectra[name].weight_change == pytest.approx(change.item(), rel=1e-4)


def test_bfloat16_base_keeps_float32_magnitude_and_trains_it(input_ids):
    model = dora(make_tiny_model("llama").to(torch.bfloat16)).train()
    layer = dict(adapter_layers(model))["model.layers.0.mlp.down_proj"]
    assert layer.magnitude.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids, labels=input_ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert layer.magnitude.grad is not None and layer.magnitude.grad.abs().max() > 0


def test_dora_options_are_checked():
    with pytest.raises(ValueError, match="dora_init='pissa' applies to method 'dora' only, not 'lora'"):
        AdapterConfig(method="lora", dora_init="pissa")
    with pytest.raises(ValueError, match="dora_init must be 'lora' or 'pissa', got 'olora'"):
        AdapterConfig(method="dora", dora_init="olora")
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=r"rank 40 exceeds min\(out, in\) of layer\(s\): 'model.layers.0.self_attn"):
        dora(model, rank=40)


def test_no_grad_forwards_reuse_the_norm_but_never_a_stale_one(input_ids):
    """Generation reuses the row norm between tokens; a fused AdamW step (which does not bump version counters)
    and inference-mode caches must still never leak a stale or inference tensor into training."""
    model = dora(make_tiny_model("llama"))
    perturb(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    for _ in range(2):
        with torch.inference_mode():
            model(input_ids)  # fills the caches with inference tensors
        with torch.no_grad():
            before = model(input_ids).logits
        model(input_ids, labels=input_ids).loss.backward()  # with gradients, right after inference mode
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            after = model(input_ids).logits
            fresh = copy.deepcopy(model)(input_ids).logits  # new storages: nothing cached can match
        assert torch.equal(after, fresh) and not torch.equal(before, after)


def test_dropout_follows_peft_s_form(input_ids):
    """With dropout active PEFT rescales ``W x_d`` and ``B A x_d`` of the dropped-out input and keeps ``W x`` of the
    clean one; the same random masks (same seed, same order of draws) give the same training-mode logits."""
    base = make_tiny_model("llama")
    ours = dora(copy.deepcopy(base), dropout=0.3).train()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    perturb(ours)
    copy_tensors(ours, theirs, to_peft=True)
    torch.manual_seed(11)
    ours_logits = ours(input_ids).logits
    torch.manual_seed(11)
    theirs_logits = theirs(input_ids).logits
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=TOL)
    with torch.no_grad():
        assert (ours_logits - ours.eval()(input_ids).logits).abs().max() > 1e-3  # the masks did something
