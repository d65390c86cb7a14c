"""LitSVDAdapter + SVDInit + SpectralMonitor in real (tiny, CPU) Trainer runs."""

from __future__ import annotations

import glob

import lightning as L
import pytest
import torch
from conftest import make_tiny_model
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import RandomTokensData, quiet_cpu_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_svd import AdapterConfig, adapter_layers, adapter_state_dict, available_adapters, orthonormal_regularizer
from lit_svd.callbacks import SpectralMonitor, SVDInit
from lit_svd.module import LitSVDAdapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_module(method: str = "sorsa", rank: int = 4, seed: int = 0, **kwargs) -> LitSVDAdapter:
    quantization = kwargs.pop("base_quantization", "nf4" if method == "loftq" else None)  # LoftQ needs one
    config = AdapterConfig(
        method=method,
        rank=rank,
        target_modules=TARGETS,
        gamma=kwargs.pop("gamma", 4e-4),
        base_quantization=quantization,
    )
    return LitSVDAdapter(
        make_tiny_model("llama", seed=seed), config, learning_rate=kwargs.pop("learning_rate", 1e-2), **kwargs
    )


def trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    """``quiet_cpu_trainer``, deterministic, without sanity validation and without callbacks unless given."""
    return quiet_cpu_trainer(
        tmp_path, max_steps, **{"deterministic": True, "num_sanity_val_steps": 0, "callbacks": None, **kwargs}
    )


@pytest.mark.parametrize("method", available_adapters())
def test_fit_logs_train_and_spectral_tags_and_heatmap(method, tmp_path):
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    run = trainer(
        tmp_path, 5, logger=logger, log_every_n_steps=1, callbacks=[SVDInit(), SpectralMonitor(every_n_steps=2)]
    )
    run.fit(make_module(method), datamodule=RandomTokensData())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/tokens_per_second",
        "val/loss",
        "spectral/sv_drift_mean",
        "spectral/sv_drift_max",
        "spectral/orth_U_max",
        "spectral/orth_V_max",
        "spectral/weight_change_mean",
        "init/seconds",
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert "spectral/drift_heatmap" in events.Tags()["images"]
    assert "spectral/singular_values" in events.Tags()["histograms"]
    # training moved the adapters away from init
    change = [e.value for e in events.Scalars("spectral/weight_change_max")]
    assert change[-1] > 0
    if method == "sorsa":
        assert "train/orthonormality" in scalars
    vectors = {"dora": ["magnitude"], "vera": ["lambda_d", "lambda_b"], "osora": ["output_scale"]}.get(method, [])
    for vector in vectors:  # the per-dimension vectors these methods train are followed too, and they moved
        assert events.Scalars(f"spectral/{vector}_drift_max")[-1].value > 0, vector


def test_the_progress_bar_shows_the_loss_and_the_logger_gets_it_only_as_train_loss(tmp_path):
    L.seed_everything(0)
    run = trainer(tmp_path, 3, limit_val_batches=0, callbacks=[SVDInit()])
    run.fit(make_module("sorsa"), datamodule=RandomTokensData())
    shown = run.progress_bar_metrics
    assert set(shown) >= {"loss"} and "train/loss" not in shown
    assert shown["loss"] == pytest.approx(float(run.callback_metrics["train/loss"]), rel=1e-6)  # on a CPU: no lag
    assert "loss" not in run.logged_metrics and "train/loss" in run.logged_metrics


def test_monitor_images_every_n_steps_and_final_state(tmp_path):
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = SpectralMonitor(every_n_steps=2, images_every_n_steps=4)
    trainer(tmp_path, 7, logger=logger, log_every_n_steps=1, callbacks=[SVDInit(), monitor]).fit(
        make_module("pissa"), datamodule=RandomTokensData()
    )
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    # scalars at step 1 and every 2 steps, plus the final state (step 7) measured at the end of training
    # Scalars follow Lightning's step index (global step − 1): measured after optimizer steps 1, 2, 4, 6 and
    # once more at the end of training (step 7) — five distinct measurements.
    drift = events.Scalars("spectral/sv_drift_max")
    assert len({e.value for e in drift}) == 5
    assert drift[-1].step == 6
    assert drift[-1].value == pytest.approx(max(s.sv_drift for s in monitor.last_spectra.values()), rel=1e-6)
    # images after step 1, every 4 steps and at the end
    assert [e.step for e in events.Images("spectral/drift_heatmap")] == [1, 4, 7]


def test_monitor_rejects_an_image_interval_off_the_measurement_grid():
    with pytest.raises(ValueError, match="images_every_n_steps must be a positive multiple of every_n_steps=50"):
        SpectralMonitor(every_n_steps=50, images_every_n_steps=75)
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer, got 0"):
        SpectralMonitor(every_n_steps=0)


def test_hook_order_and_regularizer_once_per_optimizer_step(tmp_path):
    calls: list[str] = []

    class Recording(LitSVDAdapter):
        def on_before_optimizer_step(self, optimizer):
            calls.append("on_before_optimizer_step")

        def clip_gradients(self, *args, **kwargs):
            calls.append("clip")
            super().clip_gradients(*args, **kwargs)

        def apply_regularizer_gradient(self, optimizer):
            calls.append("regularizer")
            super().apply_regularizer_gradient(optimizer)

        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            calls.append("step_done")

    config = AdapterConfig(method="sorsa", rank=4, target_modules=TARGETS)
    module = Recording(make_tiny_model("llama"), config, learning_rate=1e-2)
    run = trainer(tmp_path, 3, accumulate_grad_batches=2, gradient_clip_val=0.5, limit_val_batches=0)
    run.fit(module, datamodule=RandomTokensData(count=32, batch_size=2))
    expected = ["on_before_optimizer_step", "clip", "regularizer", "step_done"] * 3
    assert calls == expected


def test_bf16_mixed_clips_the_fused_adamw_gradients(tmp_path):
    """Lightning's bf16-mixed plugin refuses clipping with a fused optimizer (a float16 loss-scale guard); the
    module clips itself there, so a subclass may train with the fused AdamW under bf16-mixed and clipping."""
    norms: list[float] = []

    class Recording(LitSVDAdapter):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, fused=True)

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))

    config = AdapterConfig(method="lora", rank=4, target_modules=TARGETS)  # no regulariser after the clip
    module = Recording(make_tiny_model("llama"), config, learning_rate=1e-2)
    run = trainer(tmp_path, 2, precision="bf16-mixed", gradient_clip_val=1e-4, limit_val_batches=0)
    run.fit(module, datamodule=RandomTokensData(count=8, batch_size=2))
    assert run.optimizers[0].defaults["fused"] is True
    assert len(norms) == 2
    assert max(norms) <= 1e-4 * (1 + 1e-3), norms  # unclipped, the task gradient's norm is ~1e-1


def test_regularizer_gradient_is_gamma_over_lr_after_clipping():
    """Inside configure_gradient_clipping: clipped task grad + (γ/η)·∇L_orth, exactly."""
    module = make_module("sorsa", gamma=0.25, learning_rate=0.5)
    layers = [layer for _, layer in adapter_layers(module.model)]
    from lit_svd import initialize_adapters

    initialize_adapters(module.model)
    with torch.no_grad():  # make L_orth non-trivial
        for layer in layers:
            layer.U.mul_(1.1)
    params = [p for p in module.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    optimizer = torch.optim.SGD(params, lr=0.5)
    reg = orthonormal_regularizer(module.model)
    expected_reg = torch.autograd.grad(reg, params, allow_unused=True)
    module.log = lambda *a, **k: None  # not attached to a Trainer
    module.apply_regularizer_gradient(optimizer)
    for p, g in zip(params, expected_reg, strict=True):
        extra = torch.zeros_like(p) if g is None else g * (0.25 / 0.5)
        torch.testing.assert_close(p.grad, torch.full_like(p, 3.0) + extra)


def test_regularizer_gradient_per_param_group_learning_rate_and_missing_grads():
    """Two learning rates, some factors without a task gradient yet: each gets exactly (γ/η_group)·∇L_orth."""
    from lit_svd import initialize_adapters

    module = make_module("sorsa", gamma=0.25, learning_rate=0.5)
    initialize_adapters(module.model)
    with torch.no_grad():
        for _, layer in adapter_layers(module.model):
            layer.U.mul_(1.1)
            layer.V.mul_(0.9)
    params = [p for p in module.model.parameters() if p.requires_grad]
    first, second = params[::2], params[1::2]
    for p in first:
        p.grad = torch.full_like(p, 3.0)
    for p in second:
        p.grad = None
    optimizer = torch.optim.SGD([{"params": first, "lr": 0.5}, {"params": second, "lr": 0.2}], lr=0.5)
    expected_reg = torch.autograd.grad(orthonormal_regularizer(module.model), params, allow_unused=True)
    module.log = lambda *a, **k: None
    module.apply_regularizer_gradient(optimizer)
    regularised = 0
    for index, (p, g) in enumerate(zip(params, expected_reg, strict=True)):
        task, lr = (3.0, 0.5) if index % 2 == 0 else (0.0, 0.2)
        if g is None:
            assert (p.grad is None) if task == 0.0 else torch.equal(p.grad, torch.full_like(p, task))
            continue
        regularised += 1
        torch.testing.assert_close(p.grad, torch.full_like(p, task) + g * (0.25 / lr))
    assert regularised >= 4  # U and V of both groups


def test_regularizer_gradient_counts_factors_the_optimizer_does_not_train():
    """L_orth averages over every factor; one layer's frozen factors still count in the mean (and get nothing)."""
    from lit_svd import initialize_adapters

    module = make_module("sorsa", gamma=0.25)
    initialize_adapters(module.model)
    layers = [layer for _, layer in adapter_layers(module.model)]
    with torch.no_grad():
        for layer in layers:
            layer.U.mul_(1.1)
    layers[0].U.requires_grad_(False)
    params = [p for p in module.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    expected = torch.autograd.grad(orthonormal_regularizer(module.model), params, allow_unused=True)
    module.log = lambda *a, **k: None
    module.apply_regularizer_gradient(torch.optim.SGD(params, lr=0.5))
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if g is None else g * (0.25 / 0.5))
    assert layers[0].U.grad is None


def test_a_subclass_regularizer_replaces_the_orthonormal_one():
    class SquaredS(LitSVDAdapter):
        def regularizer(self):
            return sum(layer.S.pow(2).sum() for _, layer in adapter_layers(self.model))

    config = AdapterConfig(method="sorsa", rank=4, target_modules=TARGETS, gamma=0.25)
    module = SquaredS(make_tiny_model("llama", seed=0), config, learning_rate=0.5)
    from lit_svd import initialize_adapters

    initialize_adapters(module.model)
    params = [p for p in module.model.parameters() if p.requires_grad]
    module.log = lambda *a, **k: None
    module.apply_regularizer_gradient(torch.optim.SGD(params, lr=0.5))
    for _, layer in adapter_layers(module.model):
        torch.testing.assert_close(layer.S.grad, 2 * layer.S.detach() * (0.25 / 0.5))
        assert layer.U.grad is None  # the orthonormal term is not added as well


def test_gamma_zero_disables_regularizer(tmp_path):
    module = make_module("sorsa", gamma=0.0)
    run = trainer(tmp_path, 2, limit_val_batches=0, callbacks=[SVDInit()])
    run.fit(module, datamodule=RandomTokensData())
    assert "train/orthonormality" not in run.callback_metrics


def test_missing_svd_init_is_added_with_a_warning(tmp_path):
    module = make_module("pissa")
    run = trainer(tmp_path, 1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="no SVDInit callback given"):
        run.fit(module, datamodule=RandomTokensData())
    assert all(bool(layer.initialized) for _, layer in adapter_layers(module.model))


def test_uninitialised_adapter_never_trains(tmp_path):
    class NoInit(LitSVDAdapter):
        def configure_callbacks(self):
            return []

    module = NoInit(make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=4, target_modules=TARGETS))
    with pytest.raises(RuntimeError, match="not initialised"):
        trainer(tmp_path, 1, limit_val_batches=0).fit(module, datamodule=RandomTokensData())


def _adapter_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(module.model).items()}


@pytest.mark.parametrize(
    # VeRA: projections re-derived. LoftQ with a 4-bit base: the same path as QSORSA/QPiSSA (re-derive,
    # re-quantize) plus its prior factors; every method's re-quantization is checked at the state-dict level
    # in tests/test_quantization.py.
    ("method", "quantization"),
    [("sorsa", None), ("lora", None), ("osora", None), ("dora", None), ("vera", None), ("loftq", "nf4")],
)
def test_resume_equals_uninterrupted_run(method, quantization, tmp_path):
    """Also with a 4-bit base: the resumed run re-quantizes the residual it re-derives, to the same codes."""
    steps = 4  # one epoch = 4 batches; the "kill" happens at the epoch boundary
    L.seed_everything(1)
    full = make_module(method, base_quantization=quantization)
    trainer(tmp_path / "full", 2 * steps, limit_val_batches=0, callbacks=[SVDInit()]).fit(
        full, datamodule=RandomTokensData()
    )

    class Killed(Exception):
        pass

    class KillAtStep(L.Callback):
        def on_train_batch_start(self, run, pl_module, batch, batch_idx):
            if run.global_step == steps:
                raise Killed

    L.seed_everything(1)
    first = make_module(method, base_quantization=quantization)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=steps, save_top_k=-1)
    with pytest.raises(Killed):  # same configuration as the full run, killed after N steps
        trainer(
            tmp_path / "a",
            2 * steps,
            limit_val_batches=0,
            enable_checkpointing=True,
            callbacks=[SVDInit(), checkpoint, KillAtStep()],
        ).fit(first, datamodule=RandomTokensData())
    L.seed_everything(1)
    resumed = make_module(method, base_quantization=quantization)
    init = SVDInit()
    trainer(tmp_path / "b", 2 * steps, limit_val_batches=0, callbacks=[init]).fit(
        resumed, datamodule=RandomTokensData(), ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={steps}.ckpt"
    )
    assert init.report is None, "resume must not re-run the SVD"
    expected, got = _adapter_tensors(full), _adapter_tensors(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # and the residual base weights were rebuilt identically
    for (name, a), (_, b) in zip(adapter_layers(full.model), adapter_layers(resumed.model), strict=True):
        assert a.quantized == b.quantized == (quantization is not None), name
        assert torch.equal(a.base_layer.weight, b.base_layer.weight), name


def test_checkpoint_holds_only_adapter_tensors(tmp_path):
    module = make_module("sorsa")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 2, limit_val_batches=0, callbacks=[SVDInit(), checkpoint], enable_checkpointing=True).fit(
        module, datamodule=RandomTokensData()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(state["state_dict"]) == {f"model.{k}" for k in adapter_state_dict(module.model)}
    assert not any("base_layer" in k or "embed" in k for k in state["state_dict"])
    assert state["lit_svd"]["method"] == "sorsa" and state["lit_svd"]["rank"] == 4


def test_checkpoint_of_another_method_or_rank_is_rejected(tmp_path):
    module = make_module("sorsa")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 1, limit_val_batches=0, callbacks=[SVDInit(), checkpoint], enable_checkpointing=True).fit(
        module, datamodule=RandomTokensData()
    )
    with pytest.raises(ValueError, match=r"method: checkpoint 'sorsa' vs this module 'pissa'"):
        trainer(tmp_path, 2, limit_val_batches=0).fit(
            make_module("pissa"), datamodule=RandomTokensData(), ckpt_path=tmp_path / "last.ckpt"
        )
    with pytest.raises(ValueError, match=r"rank: checkpoint 4 vs this module 8"):
        trainer(tmp_path, 2, limit_val_batches=0).fit(
            make_module("sorsa", rank=8), datamodule=RandomTokensData(), ckpt_path=tmp_path / "last.ckpt"
        )


def test_load_from_checkpoint_reproduces_logits(tmp_path):
    module = make_module("osora")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, 3, limit_val_batches=0, callbacks=[SVDInit(), checkpoint], enable_checkpointing=True).fit(
        module, datamodule=RandomTokensData()
    )
    ids = torch.randint(0, 101, (2, 9))
    module.eval()
    with torch.no_grad():
        expected = module.model(ids).logits
    restored = LitSVDAdapter.load_from_checkpoint(tmp_path / "last.ckpt", model=make_tiny_model("llama")).eval()
    with torch.no_grad():
        assert torch.equal(restored.model(ids).logits, expected)


def test_exports_are_atomic_and_refuse_bad_state(tmp_path):
    module = make_module("sorsa")
    with pytest.raises(ValueError, match="was never initialised"):
        module.export_peft_lora(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    assert not glob.glob(str(tmp_path / ".peft*"))  # no staging leftovers
    from lit_svd import initialize_adapters

    initialize_adapters(module.model)
    next(iter(adapter_layers(module.model)))[1].merge()
    with pytest.raises(ValueError, match="is merged; unmerge"):
        module.export_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    next(iter(adapter_layers(module.model)))[1].unmerge()
    with pytest.raises(FileExistsError, match="not empty"):
        module.export_peft_lora(tmp_path / "taken")
