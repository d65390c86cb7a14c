"""4-bit NF4 frozen bases (QLoRA, QPiSSA, QSORSA, QOSoRA, QOLoRA, QMiLoRA) and LoftQ, on tiny CPU models.

The quantizer is bitsandbytes' CPU NF4 path; everything computes in float32.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TARGETS, TOLERANCE, adapted, logits, make_tiny_model, perturb
from transformers import AutoModelForCausalLM

from lit_svd import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    available_adapters,
    inject_adapters,
    load_adapter_state_dict,
    merge_adapters,
    quantization,
)
from lit_svd.export import export_merged, export_peft_lora
from lit_svd.quantization import NF4Linear, nf4_round_trip

QUANTIZED = tuple(m for m in available_adapters() if m != "loftq")  # the methods that also run unquantized


def original_weights(arch: str) -> dict[str, torch.Tensor]:
    """``W`` (m, n) of every targeted layer of the freshly built tiny model."""
    model = make_tiny_model(arch)
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TINY_TARGETS[arch]:
            out[name] = (module.weight.T if arch == "gpt2" else module.weight).detach().clone()
    return out


def reference_nf4(matrix: torch.Tensor) -> torch.Tensor:
    """NF4 round trip in plain torch: blocks of 64 consecutive weights, absmax scale, nearest of 16 levels."""
    levels = torch.tensor(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0]
    )  # fmt: skip
    flat = matrix.flatten()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 64)).reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    nearest = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)
    return (levels[nearest] * absmax).flatten()[: flat.numel()].view(matrix.shape)


@pytest.mark.parametrize("shape", [(32, 32), (48, 32), (7, 9), (192, 576)])
def test_nf4_round_trip_matches_a_plain_torch_reference(shape):
    # bitsandbytes 0.50's CPU kernel gets 2-D shapes with in_features % 64 != 0 wrong; NF4Linear must not.
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layer = NF4Linear.from_matrix(matrix, double_quantization=False)
    torch.testing.assert_close(layer.dequantized(), reference_nf4(matrix), rtol=0, atol=1e-6)
    relative = (nf4_round_trip(matrix) - matrix).norm() / matrix.norm()
    assert 0.08 < relative < 0.1  # NF4 on Gaussian weights, with double quantization too


@pytest.mark.parametrize("double_quantization", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dequantize_operator_agrees_with_its_fake_kernel(double_quantization, dtype):
    # torch.compile plans a 4-bit layer from the fake kernel; a real output of another shape (bitsandbytes'
    # own operator gives (1, numel) on the CPU) fails the compiled layer at its first call.
    layer = NF4Linear.from_matrix(torch.randn(48, 32), double_quantization=double_quantization)
    nested = (layer.nested_absmax, layer.nested_code, layer.offset) if double_quantization else (None, None, None)
    args = (layer.packed, layer.absmax, *nested, 48 * 32, dtype)
    torch.library.opcheck(quantization._dequantize_nf4_op, args, test_utils=("test_schema", "test_faketensor"))
    out = quantization._dequantize_nf4_op(*args)
    assert out.shape == (48 * 32,) and out.dtype == dtype
    torch.testing.assert_close(out.view(48, 32), layer.dequantized(dtype), rtol=0, atol=0)


# Every method on the tiny Llama, and GPT-2's Conv1D layers with one SVD method and LoRA (QLoRA).
CASES = [("llama", m) for m in QUANTIZED] + [("gpt2", "pissa"), ("gpt2", "lora")]


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_quantization_comes_after_the_exact_init_and_keeps_no_full_precision_copy(arch, method):
    plain = adapted(arch, method)
    quantized = adapted(arch, method, base_quantization="nf4")
    for (name, p), (_, q) in zip(adapter_layers(plain), adapter_layers(quantized), strict=True):
        assert not p.quantized and q.quantized and isinstance(q.base_layer, NF4Linear)
        for tensor_name in p.adapter_tensor_names:  # factors, snapshots: bit for bit
            assert torch.equal(getattr(p, tensor_name), getattr(q, tensor_name)), (name, tensor_name)
        # the base is NF4 of the full-precision *residual* (of W itself for LoRA), nothing else
        assert torch.equal(q.weight_matrix(), nf4_round_trip(p.weight_matrix().detach()))
        big = {(q.out_features, q.in_features), (q.in_features, q.out_features)}
        kept = [
            f"{n} {tuple(t.shape)} {t.dtype}"
            for n, t in [*q.named_parameters(), *q.named_buffers()]
            if t.is_floating_point() and tuple(t.shape) in big
        ]
        assert not kept, (name, kept)
        # 4 bits per weight plus scales (the 8-bit scales' code table, 1 KiB per layer, aside): < 0.6 bytes per weight
        stored = sum(t.numel() * t.element_size() for n, t in q.base_layer.named_buffers() if "code" not in n)
        assert stored < 0.6 * q.out_features * q.in_features, (name, stored)


@pytest.mark.parametrize("method", ["sorsa", "dora", "vera"])  # DoRA and VeRA have their own forward
def test_forward_and_backward_save_no_m_by_n_tensor_and_give_the_dequantized_gradient(method):
    model = adapted("llama", method, base_quantization="nf4")
    layer = dict(adapter_layers(model))["model.layers.0.mlp.gate_proj"]  # m=48, n=32
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    big = {(layer.out_features, layer.in_features), (layer.in_features, layer.out_features)}
    assert not [s for s in saved if s[-2:] in big], saved
    grad = torch.randn_like(out)
    out.backward(grad)
    W = layer.merged_weight()  # deq(base) + delta; DoRA's rows rescaled by its magnitude
    torch.testing.assert_close(out, x @ W.T, rtol=0, atol=TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad, grad @ W, rtol=0, atol=TOLERANCE[torch.float32])
    assert all(getattr(layer, n).grad is not None for n in layer.trainable_names) and layer.base_layer.bias is None


def test_dora_on_a_4bit_base_dequantizes_for_its_norm_only_when_the_norm_is_stale(monkeypatch):
    # Every read of a 4-bit base's weight dequantizes into a fresh tensor; DoRA's caches must follow the packed
    # codes, not that tensor, or generation recomputes ‖W + s·BA‖ (one pass over W) at every token.
    from lit_svd import adapter_layers

    model = adapted("llama", "dora", base_quantization="nf4")
    perturb(model)
    layer = next(layer for _, layer in adapter_layers(model))
    reads = []
    dequantize = quantization._dequantized_weight
    monkeypatch.setattr(quantization, "_dequantized_weight", lambda *a, **k: reads.append(1) or dequantize(*a, **k))
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = layer(x)
        before = len(reads)
        again = layer(x)
    assert len(reads) - before == 1  # the base layer's own forward; the norm came from the cache
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    row_norms = layer._row_norms_sq[1]
    trained = layer(x)  # with gradients: the norm is recomputed (A, B may have changed), ‖W_i‖² is not
    layer(x)
    assert layer._row_norms_sq[1] is row_norms
    torch.testing.assert_close(trained, first, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["pissa", "sorsa", "osora", "olora", "loftq"])
def test_the_quantized_residual_is_closer_to_W_than_qlora(method):
    """‖W − (deq(Q(W_res)) + delta)‖_F / ‖W − deq(Q(W))‖_F < 1 (QLoRA = 1), summed over the tiny Llama."""
    weights = original_weights("llama")
    ratios = {}
    for m in ("lora", method):
        model = adapted("llama", m, base_quantization="nf4")
        num = sum(
            (weights[n] - (layer.weight_matrix() + layer.delta_weight())).norm() ** 2
            for n, layer in adapter_layers(model)
        )
        den = sum((w - nf4_round_trip(w)).norm() ** 2 for w in weights.values())
        ratios[m] = (num / den).sqrt().item()
    assert ratios["lora"] == pytest.approx(1.0, abs=1e-6)
    assert ratios[method] < 0.95, ratios


def test_loftq_iterations_reduce_the_error_and_one_step_keeps_qloras_base():
    weights = original_weights("llama")
    qlora = adapted("llama", "lora", base_quantization="nf4")
    errors = []
    for iters in (1, 2, 4):
        model = adapted("llama", "loftq", base_quantization="nf4", loftq_iters=iters)
        layers = dict(adapter_layers(model))
        if iters == 1:  # T = 1: the base is NF4(W), exactly QLoRA's
            for name, layer in adapter_layers(qlora):
                assert torch.equal(layers[name].weight_matrix(), layer.weight_matrix())
                assert not layers[name].prior_A.any()
        errors.append(
            sum((weights[n] - (lay.weight_matrix() + lay.delta_weight())).norm() ** 2 for n, lay in layers.items())
        )
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize(("arch", "method"), [*CASES, ("llama", "loftq")])
def test_adapter_state_dict_rebuilds_and_requantizes_the_same_base(arch, method, input_ids):
    kwargs = {"base_quantization": "nf4", "loftq_iters": 2}
    model = adapted(arch, method, **kwargs)
    perturb(model)
    trained = logits(model, input_ids)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    assert not any("base_layer" in k or "packed" in k or "absmax" in k for k in state)
    fresh = make_tiny_model(arch)  # original full-precision weights again
    inject_adapters(fresh, model.lit_svd_config, initialize=False)
    load_adapter_state_dict(fresh, state)
    for (name, a), (_, b) in zip(adapter_layers(model), adapter_layers(fresh), strict=True):
        assert b.quantized
        for buffer_name, buffer in a.base_layer.named_buffers():
            assert torch.equal(buffer, getattr(b.base_layer, buffer_name)), (name, buffer_name)
    torch.testing.assert_close(logits(fresh, input_ids), trained, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "method"), [("llama", "lora"), ("llama", "sorsa"), ("llama", "loftq"), ("gpt2", "osora")]
)
def test_merged_model_is_dequantized_base_plus_delta_and_loads_with_from_pretrained(arch, method, input_ids, tmp_path):
    model = adapted(arch, method, base_quantization="nf4")
    perturb(model)
    trained = logits(model, input_ids)
    export_merged(model, tmp_path / "export")  # from the state dict, model unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(logits(reloaded, input_ids), trained, rtol=0, atol=TOLERANCE[torch.float32])
    merged = merge_adapters(model)  # in place: plain full-precision layers again
    assert not list(adapter_layers(merged))
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), trained, rtol=0, atol=TOLERANCE[torch.float32])
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, input_ids), trained, rtol=0, atol=TOLERANCE[torch.float32])


def test_in_place_merge_into_a_4bit_base_is_refused_naming_the_layer():
    model = adapted("llama", "pissa", base_quantization="nf4")
    name, layer = next(adapter_layers(model))
    with pytest.raises(ValueError, match=rf"cannot merge the adapter of layer '{name}' into its 4-bit \(NF4\) base"):
        layer.merge()
    assert not layer.merged and layer.quantized


def test_config_errors_name_the_offending_setting():
    with pytest.raises(ValueError, match=r"unknown base_quantization 'nf8'; choose one of: nf4 \(or None"):
        AdapterConfig(method="pissa", base_quantization="nf8")
    with pytest.raises(ValueError, match=r"method 'loftq' fits its factors to a quantized base: set base_quant"):
        AdapterConfig(method="loftq")
    with pytest.raises(ValueError, match=r"loftq_iters must be a positive integer, got 0"):
        AdapterConfig(method="loftq", base_quantization="nf4", loftq_iters=0)


def test_a_float64_model_is_refused_before_it_is_touched():
    model = make_tiny_model("llama").double()
    config = AdapterConfig(method="sorsa", rank=2, target_modules=["q_proj"], base_quantization="nf4")
    with pytest.raises(ValueError, match=r"takes float32/bfloat16/float16 weights; layer\(s\) 'model.layers.0"):
        inject_adapters(model, config)
    assert not list(adapter_layers(model))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2: PEFT's fan_in_fan_out for Conv1D
def test_peft_exports_state_their_base_and_reproduce_what_they_promise(arch, input_ids, tmp_path):
    from peft import PeftModel

    model = adapted(arch, "pissa", base_quantization="nf4")
    perturb(model)
    trained = logits(model, input_ids)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}

    # base="dequantized": the current delta on the dequantized 4-bit base written beside it: exact
    export_peft_lora(model, tmp_path / "dequantized", base="dequantized")
    info = json.loads((tmp_path / "dequantized" / "lit_svd.json").read_text())
    assert info["expected_base"] == "dequantized" and info["base_quantization"] == "nf4"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized" / "base_model")
    served = PeftModel.from_pretrained(base, tmp_path / "dequantized").eval()
    assert served.peft_config["default"].r == 4
    torch.testing.assert_close(logits(served, input_ids), trained, rtol=0, atol=TOLERANCE[torch.float32])

    # base="original" (default): the change against the original W, i.e. the same adapter on a full-precision
    # residual — the trained model without the base's quantization error
    export_peft_lora(model, tmp_path / "original", base_model_name_or_path="tiny")
    info = json.loads((tmp_path / "original" / "lit_svd.json").read_text())
    assert info["expected_base"] == "original" and "quantization error" in info["note"]
    served = PeftModel.from_pretrained(make_tiny_model(arch), tmp_path / "original").eval()
    assert served.peft_config["default"].r == 8
    full_precision = make_tiny_model(arch)
    config = AdapterConfig(method="pissa", rank=4, target_modules=TINY_TARGETS[arch])
    inject_adapters(full_precision, config, initialize=False)
    load_adapter_state_dict(full_precision, state)
    expected = logits(full_precision, input_ids)
    torch.testing.assert_close(logits(served, input_ids), expected, rtol=0, atol=TOLERANCE[torch.float32])
    assert (expected - trained).abs().max() > 1e-3  # the quantization error the note warns about


def test_dequantized_peft_export_needs_a_4bit_base(tmp_path):
    with pytest.raises(ValueError, match="base='dequantized' is for models with a 4-bit base"):
        export_peft_lora(adapted("llama", "pissa"), tmp_path / "x", base="dequantized")
    assert not (tmp_path / "x").exists()


def test_fsdp_refuses_a_4bit_base_naming_a_layer():
    from lit_svd.strategies import refuse_quantized_bases

    refuse_quantized_bases(adapted("llama", "pissa"))  # full precision: fine
    model = inject_adapters(
        make_tiny_model("llama"),
        AdapterConfig(method="pissa", rank=2, target_modules=["q_proj"], base_quantization="nf4"),
        initialize=False,  # refused before init too: the strategy checks before it initialises
    )
    with pytest.raises(ValueError, match=r"cannot shard 4-bit \(NF4\) bases \(e.g. layer 'model.layers.0.self_attn"):
        refuse_quantized_bases(model)


# LoRA-GA: SVDInit's calibration stage differentiates the full-precision model, then the init quantizes.
@pytest.mark.parametrize("method", ["sorsa", "loraga"])
def test_lightning_fit_with_4bit_base_gradient_checkpointing_and_spectral_monitor(method, tmp_path):
    import lightning as L
    from lightning_helpers import RandomTokensData, quiet_cpu_trainer

    from lit_svd.callbacks import SpectralMonitor, SVDInit
    from lit_svd.module import LitSVDAdapter

    L.seed_everything(0)
    config = AdapterConfig(method=method, rank=4, target_modules=["q_proj", "down_proj"], base_quantization="nf4")
    module = LitSVDAdapter(make_tiny_model("llama"), config, learning_rate=1e-2, gradient_checkpointing=True)
    assert not any(layer.quantized for _, layer in adapter_layers(module.model))  # quantized at fit start
    monitor = SpectralMonitor(every_n_steps=1, log_images=False)
    init = SVDInit(calibration_batches=2)
    trainer = quiet_cpu_trainer(tmp_path, 3, limit_val_batches=0, callbacks=[init, monitor])
    before = None

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.clone() for k, v in adapter_state_dict(pl_module.model).items()}

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=RandomTokensData())
    layers = dict(adapter_layers(module.model))
    assert all(layer.quantized for layer in layers.values())
    # SVDInit reports the error of the model as trained: the 4-bit base's, not ~1e-7
    assert 1e-3 < init.report["max_reconstruction_error"] < 0.2
    assert set(monitor.last_spectra) == {f"model.{n}" for n in layers}  # the monitor walks the LightningModule
    assert all(s.weight_change > 0 for s in monitor.last_spectra.values())
    after = adapter_state_dict(module.model)
    trained = tuple(f".{n}" for n in next(iter(layers.values())).trainable_names)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith(trained))


@pytest.mark.slow
def test_quantized_residual_error_is_below_qloras_on_smollm2(smollm2):
    """The QPiSSA claim on real weights: ‖W − (deq(Q(W_res)) + delta)‖_F < ‖W − deq(Q(W))‖_F, per matrix."""
    import copy

    from torch import nn

    holder = nn.Module()  # q, v, down projections of three decoder layers (as tests/test_smollm2_exactness.py)
    for i in (0, 14, 29):
        for path in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            holder.add_module(
                f"l{i}_{path.replace('.', '_')}", copy.deepcopy(smollm2.model.layers[i].get_submodule(path))
            )
    originals = {n: m.weight.detach().clone() for n, m in holder.named_children()}
    qlora = {n: (w - nf4_round_trip(w)).norm().item() for n, w in originals.items()}
    for method in ("pissa", "sorsa", "loftq"):
        model = copy.deepcopy(holder)
        inject_adapters(
            model, AdapterConfig(method=method, rank=16, target_modules="all-linear", base_quantization="nf4")
        )
        for name, layer in adapter_layers(model):
            error = (originals[name] - (layer.weight_matrix() + layer.delta_weight())).norm().item()
            assert error < 0.99 * qlora[name], (method, name, error / qlora[name])
