"""VeRA: PEFT's very projections from the seed, parity with ``VeraConfig`` (outputs and gradients), shared
and never stored projections, PEFT VeRA export, the scaling-vector curves and bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import TOLERANCE, make_tiny_model

from lit_svd import AdapterConfig, adapter_layers, adapter_state_dict, inject_adapters, load_adapter_state_dict
from lit_svd.export import export_peft_lora
from lit_svd.spectral import layer_spectra

TARGETS = ["q_proj", "k_proj", "gate_proj", "down_proj"]  # (32, 32), (16, 32), (48, 32), (32, 48)
TOL = TOLERANCE[torch.float32]


def vera(model, rank: int = 4, targets=TARGETS, **kwargs):
    return inject_adapters(model, AdapterConfig(method="vera", rank=rank, target_modules=targets, **kwargs))


def peft_pair(seed: int = 0):
    base = make_tiny_model("llama")
    ours = vera(copy.deepcopy(base), vera_seed=seed)
    config = peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=seed)
    return base, ours, peft.get_peft_model(copy.deepcopy(base), config)


def peft_vectors(theirs, name: str) -> dict[str, torch.Tensor]:
    layer = theirs.base_model.model.get_submodule(name)
    return {"lambda_d": layer.vera_lambda_d["default"], "lambda_b": layer.vera_lambda_b["default"]}


def perturb(tensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(0.3 * torch.randn(t.shape, generator=g))


def test_projections_are_peft_s_from_the_seed_shared_and_sliced():
    _, ours, theirs = peft_pair(seed=7)
    layers = dict(adapter_layers(ours))
    projections = {id(layer.projections) for layer in layers.values()}
    assert len(projections) == 1  # one pair for the model
    shared = next(iter(layers.values())).projections
    # sized to the largest in/out features among the targets, as PEFT's VeraModel._find_dim
    assert tuple(shared.A.shape) == (4, 48) and tuple(shared.B.shape) == (48, 4)
    assert torch.equal(shared.A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.B, theirs.base_model.vera_B["default"])
    k_proj = layers["model.layers.0.self_attn.k_proj"]
    assert k_proj.A.shape == (4, 32) and k_proj.B.shape == (16, 4)
    assert k_proj.A.data_ptr() == layers["model.layers.1.self_attn.q_proj"].A.data_ptr()  # shared, not copied
    other_seed = vera(make_tiny_model("llama"), vera_seed=8)
    assert not torch.equal(next(adapter_layers(other_seed))[1].projections.A, shared.A)


@pytest.mark.parametrize("direction", ["to_peft", "from_peft"])
def test_peft_parity_of_outputs_and_gradients(direction, input_ids):
    base, ours, theirs = peft_pair()
    for name, layer in adapter_layers(ours):
        other = peft_vectors(theirs, name)
        assert torch.equal(layer.lambda_d, other["lambda_d"]) and torch.equal(layer.lambda_b, other["lambda_b"])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=TOL)
    names = [name for name, _ in adapter_layers(ours)]
    if direction == "to_peft":
        perturb([t for _, layer in adapter_layers(ours) for t in (layer.lambda_d, layer.lambda_b)], seed=3)
    else:
        perturb([t for name in names for t in peft_vectors(theirs, name).values()], seed=3)
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            for key, t in peft_vectors(theirs, name).items():
                (t if direction == "to_peft" else getattr(layer, key)).copy_(
                    getattr(layer, key) if direction == "to_peft" else t
                )
    ours_out, theirs_out = ours(input_ids, labels=input_ids), theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, rtol=0, atol=TOL)
    assert (ours_out.logits - base(input_ids).logits).abs().max() > 1e-2
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in adapter_layers(ours):
        for key, t in peft_vectors(theirs, name).items():
            grad = getattr(layer, key).grad
            assert grad is not None and grad.abs().max() > 0
            torch.testing.assert_close(grad, t.grad, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")


def test_projections_are_not_stored_and_are_re_derived_from_the_seed(input_ids):
    model = vera(make_tiny_model("llama"), vera_seed=3)
    perturb([t for _, layer in adapter_layers(model) for t in (layer.lambda_d, layer.lambda_b)], seed=1)
    with torch.no_grad():
        trained = model(input_ids).logits
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert {k.rsplit(".", 1)[-1] for k in state} == {
        "lambda_d", "lambda_b", "init_lambda_d", "init_lambda_b", "initialized"
    }  # fmt: skip
    assert not any("projections" in k for k in model.state_dict())  # not in a full state dict either
    fresh = vera(make_tiny_model("llama"), vera_seed=3)
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids).logits, trained)
    wrong_seed = vera(make_tiny_model("llama"), vera_seed=4)
    load_adapter_state_dict(wrong_seed, state)
    with torch.no_grad():
        assert (wrong_seed(input_ids).logits - trained).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exports_as_a_peft_vera_adapter(arch, input_ids, tmp_path):
    base = make_tiny_model(arch)
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else TARGETS  # GPT-2: Conv1D (fan_in_fan_out)
    model = vera(copy.deepcopy(base), targets=targets, vera_seed=11, vera_d_initial=0.5)
    perturb([t for _, layer in adapter_layers(model) for t in (layer.lambda_d, layer.lambda_b)], seed=2)
    with torch.no_grad():
        trained = model(input_ids).logits
    export_peft_lora(model, tmp_path / "peft")
    config = peft.PeftConfig.from_pretrained(tmp_path / "peft")
    assert isinstance(config, peft.VeraConfig) and config.projection_prng_key == 11 and config.r == 4
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids).logits, trained, rtol=0, atol=TOL)


def test_monitor_reports_the_scaling_vectors():
    model = vera(make_tiny_model("llama"), vera_d_initial=0.2)
    spectra = layer_spectra(dict(adapter_layers(model)))
    assert all(s.vector_drift == {"lambda_d": 0.0, "lambda_b": 0.0} for s in spectra.values())
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lambda_d.mul_(1.5)  # d drifts by half its start
            layer.lambda_b.fill_(0.25)  # b starts at 0: its RMS is reported
    for name, spectrum in layer_spectra(dict(adapter_layers(model))).items():
        assert spectrum.vector_drift["lambda_d"] == pytest.approx(0.5, rel=1e-6)
        assert spectrum.vector_drift["lambda_b"] == pytest.approx(0.25, rel=1e-6)
        assert spectrum.weight_change > 0, name


def test_bad_vera_input_names_the_problem():
    with pytest.raises(
        ValueError, match="rank 40 exceeds min\\(out, in\\) of layer\\(s\\): 'model.layers.0.self_attn.q_proj' "
    ):
        vera(make_tiny_model("llama"), rank=40)
    with pytest.raises(ValueError, match=r"alpha has no effect for vera \(its vectors b and d carry the scale\)"):
        AdapterConfig(method="vera", alpha=8.0)
    with pytest.raises(ValueError, match="vera_seed and vera_d_initial apply to method 'vera' only, not 'dora'"):
        AdapterConfig(method="dora", vera_seed=3)
    with pytest.raises(ValueError, match="vera_d_initial must be finite and non-zero"):
        AdapterConfig(method="vera", vera_d_initial=0.0)


def test_a_checkpoint_written_under_another_seed_is_refused():
    from lit_svd.module import LitSVDAdapter

    config = AdapterConfig(method="vera", rank=4, target_modules=TARGETS, vera_seed=1)
    module = LitSVDAdapter(make_tiny_model("llama"), config)
    saved = module._checkpoint_metadata()
    assert saved["vera_seed"] == 1 and saved["vera_d_initial"] == 0.1
    with pytest.raises(ValueError, match="vera_seed: checkpoint 0 vs this module 1"):
        module.on_load_checkpoint({"lit_svd": saved | {"vera_seed": 0}, "state_dict": {}})
