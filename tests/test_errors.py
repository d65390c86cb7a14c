"""Bad input gives a ValueError that names the offending thing, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from lit_svd import AdapterConfig, adapter_layers, inject_adapters, load_adapter_state_dict


def untouched(model, reference) -> bool:
    return not list(adapter_layers(model)) and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.values(), strict=True)
    )


def test_unknown_method_lists_choices():
    with pytest.raises(
        ValueError,
        match="unknown adapter 'sorsaa'; choose one of: corda, dora, eva, loftq, lora, loraga, milora, olora, osora, "
        "pissa, sorsa, vera",
    ):
        AdapterConfig(method="sorsaa")


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        AdapterConfig(method="nope", rank=0, dropout=1.5, gamma=-1)
    message = str(info.value)
    for fragment in ("unknown adapter 'nope'", "rank must be a positive integer", "dropout", "gamma"):
        assert fragment in message


def test_target_that_matches_nothing_lists_existing_layers():
    model = make_tiny_model("llama")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target 'q_prj' matched nothing; linear layers here: q_proj, k_proj"):
        inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj", "q_prj"]))
    assert untouched(model, reference)


def test_target_that_is_not_linear():
    model = make_tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"target 'mlp' matched 'model.layers.0.mlp' \(LlamaMLP\), which is not a linear"
    ):
        inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules=["mlp"]))


def test_regex_that_matches_nothing():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=r"target regex 'q_proj' matched no linear layer"):
        inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules="q_proj"))


def test_regex_and_all_linear_targets():
    model = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="pissa", rank=2, target_modules=r".*\.(q|v)_proj")
    )
    assert {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)} == {"q_proj", "v_proj"}
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules="all-linear"))
    names = [n for n, _ in adapter_layers(model)]
    assert len(names) == 14 and "lm_head" not in names


def test_rank_too_large_names_the_layer():
    model = make_tiny_model("llama")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    # k_proj is (16, 32): rank 20 fits q_proj (32×32) but not k_proj
    with pytest.raises(
        ValueError, match=r"rank 20 exceeds min\(out, in\) of layer\(s\): 'model.layers.0.self_attn.k_proj' \(16, 32\)"
    ):
        inject_adapters(model, AdapterConfig(method="sorsa", rank=20, target_modules=["q_proj", "k_proj"]))
    assert untouched(model, reference)


def test_non_finite_weight_names_the_layer():
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 4] = float("nan")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite values .* model.layers.1.mlp.down_proj"):
        inject_adapters(model, AdapterConfig(method="pissa", rank=2, target_modules=["down_proj"]))
    assert not list(adapter_layers(model))
    assert all(
        torch.equal(
            a,
            b,
        )
        or (a.isnan() == b.isnan()).all()
        for a, b in zip(model.state_dict().values(), reference.values(), strict=True)
    )


def test_injecting_twice():
    model = inject_adapters(make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=r"model already has lit_svd adapters \(e.g. 'model.layers.0.self_attn.q_proj'\)"
    ):
        inject_adapters(model, AdapterConfig(method="sorsa", rank=2, target_modules=["v_proj"]))


def test_osora_rejects_alpha():
    with pytest.raises(ValueError, match="alpha has no effect for osora"):
        AdapterConfig(method="osora", alpha=16)


def test_loading_a_state_dict_of_another_rank_or_method():
    config = AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj"])
    source = inject_adapters(make_tiny_model("llama"), config)
    from lit_svd import adapter_state_dict

    state = adapter_state_dict(source)
    other_rank = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=3, target_modules=["q_proj"]), initialize=False
    )
    with pytest.raises(
        ValueError,
        match=r"shape mismatch for 'model.layers.0.self_attn.q_proj.U': checkpoint \(32, 2\) vs model \(32, 3\)",
    ):
        load_adapter_state_dict(other_rank, state)
    other_method = inject_adapters(
        make_tiny_model("llama"), AdapterConfig(method="pissa", rank=2, target_modules=["q_proj"]), initialize=False
    )
    with pytest.raises(ValueError, match=r"method pissa, rank 2\): missing .* unexpected"):
        load_adapter_state_dict(other_method, state)
    assert not bool(next(iter(adapter_layers(other_method)))[1].initialized)
