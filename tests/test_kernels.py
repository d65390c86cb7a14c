"""``liger_kernels``: which model families are patched and how, the loss head it selects, the CPU fallback.

Liger's kernels are Triton kernels, so no CPU can run them; here a stand-in for Liger's patch table records
what ``apply_liger_kernels`` asks of it, and the loss head is checked to route the same labelled rows to
whichever fused kernel is chosen. The GPU numbers are in docs/performance.md.
"""

from __future__ import annotations

import sys
import types

import lightning as L
import pytest
import torch
from conftest import make_tiny_model
from lightning_helpers import RandomTokensData, quiet_cpu_trainer

import lit_svd.kernels
from lit_svd import AdapterConfig
from lit_svd.kernels import apply_liger_kernels
from lit_svd.losses import causal_lm_loss, linear_cross_entropy
from lit_svd.module import LitSVDAdapter


@pytest.fixture
def fake_liger(monkeypatch):
    """Liger's patch table with one family (llama); records each call."""
    calls = []
    table = types.ModuleType("liger_kernel.transformers.monkey_patch")
    table.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": object(), "qwen2": object()}
    table._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append((model, kwargs))
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", table)
    return calls


def test_apply_patches_norm_swiglu_and_rope_but_not_the_loss(fake_liger):
    model = make_tiny_model("llama")
    apply_liger_kernels(model)
    [(patched, options)] = fake_liger
    assert patched is model
    assert options == dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def test_apply_refuses_a_family_liger_does_not_know(fake_liger):
    with pytest.raises(ValueError, match=r"no kernels for model type 'gpt2' \(it has: llama, qwen2\)"):
        apply_liger_kernels(make_tiny_model("gpt2"))
    assert fake_liger == []


def test_apply_without_liger_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        apply_liger_kernels(make_tiny_model("llama"))


def test_loss_head_routes_the_labelled_rows_to_the_chosen_kernel(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 11, bias=False)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100
    seen = {}

    def stand_in(rows, weight, targets, bias=None):
        seen["rows"], seen["targets"] = rows.shape[0], targets.clone()
        return linear_cross_entropy(rows, weight, targets, bias=bias)

    monkeypatch.setattr(lit_svd.kernels, "liger_linear_cross_entropy", stand_in)
    routed = causal_lm_loss(hidden, head, labels, kernel="liger")
    ours = causal_lm_loss(hidden, head, labels)
    expected = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(routed, expected)
    torch.testing.assert_close(ours, expected)
    assert seen["rows"] == int((labels[:, 1:] != -100).sum()) == 10
    with pytest.raises(ValueError, match="kernel must be 'lit_svd' or 'liger', got 'triton'"):
        causal_lm_loss(hidden, head, labels, kernel="triton")


def test_liger_kernels_on_a_cpu_warn_and_train_as_without(tmp_path, fake_liger):
    losses = {}
    for flag in (False, True):
        L.seed_everything(0)
        config = AdapterConfig(method="lora", rank=4, target_modules=["q_proj", "v_proj"])
        module = LitSVDAdapter(make_tiny_model("llama"), config, learning_rate=1e-2, liger_kernels=flag)
        trainer = quiet_cpu_trainer(tmp_path / str(flag), 2, limit_val_batches=0, deterministic=True)
        if flag:
            with pytest.warns(
                UserWarning, match="Liger's kernels are Triton kernels for CUDA GPUs; this run is on cpu"
            ):
                trainer.fit(module, datamodule=RandomTokensData(count=8, batch_size=2))
        else:
            trainer.fit(module, datamodule=RandomTokensData(count=8, batch_size=2))
        losses[flag] = float(trainer.callback_metrics["train/loss"])
        assert module._liger_active is False
    assert fake_liger == []  # nothing patched on the CPU
    assert losses[True] == losses[False]
