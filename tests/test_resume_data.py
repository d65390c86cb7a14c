"""A run killed in the middle of an epoch resumes with exactly the batches an uninterrupted run sees next."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from conftest import TINY_TARGETS, make_tiny_model
from faults import KillAt, Killed, NumberedExamples, Record  # 24 numbered training examples (and 4 held out)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import quiet_cpu_trainer

from lit_svd import AdapterConfig, LitSVDAdapter, SVDInit
from lit_svd.callbacks import AdapterCheckpoint
from lit_svd.data import LengthGroupedSampler, ResumableDataLoader
from lit_svd.inject import adapter_state_dict

EXAMPLES, BATCH, STEPS, EVERY = 24, 2, 18, 5  # 12 batches per epoch: the runs cross into a second epoch


def _run(
    root, group_by_length: bool, callbacks, ckpt_path=None, steps=STEPS, max_epochs=None, **module_args
) -> LitSVDAdapter:
    L.seed_everything(3)
    module = LitSVDAdapter(
        make_tiny_model("llama"),
        AdapterConfig(method="sorsa", rank=4, target_modules=TINY_TARGETS["llama"]),
        learning_rate=1e-2,
        **module_args,
    )
    data = NumberedExamples(batch_size=BATCH, max_length=16, group_by_length=group_by_length, seed=7)
    trainer = quiet_cpu_trainer(
        root,
        steps,
        max_epochs=max_epochs,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[SVDInit(), *callbacks],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize(("kill", "saved"), [(7, 5), (17, 15)])  # mid epoch 0; mid epoch 1
def test_a_mid_epoch_resume_sees_the_batches_of_the_uninterrupted_run(tmp_path, group_by_length, kill, saved):
    whole = Record(None)
    full = _run(tmp_path / "full", group_by_length, [whole])
    assert len(whole.numbers) == STEPS
    assert sorted(n for batch in whole.numbers[:12] for n in batch) == list(range(1, EXAMPLES + 1))  # one epoch

    first = Record(None)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=EVERY, save_top_k=-1)
    with pytest.raises(Killed):
        _run(tmp_path / "a", group_by_length, [KillAt(kill), first, checkpoints])
    assert first.numbers == whole.numbers[:kill]
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*step={saved}.ckpt")

    rest = Record(None)
    resumed = _run(tmp_path / "b", group_by_length, [rest], ckpt_path=checkpoint)
    assert rest.numbers == whole.numbers[saved:]  # nothing repeated, nothing skipped, same order
    for key, value in adapter_state_dict(full.model).items():
        torch.testing.assert_close(adapter_state_dict(resumed.model)[key], value, rtol=0, atol=0, msg=key)


def test_an_epoch_based_fit_resumes_mid_epoch_with_the_batches_of_the_uninterrupted_run(tmp_path):
    """max_epochs without max_steps: the schedule's length (estimated_stepping_batches, read when the optimizer
    is configured) makes Lightning build the loader before the restore; the module hands it its position."""
    epochs = dict(steps=-1, max_epochs=2, group_by_length=True)
    whole = Record(None)
    _run(tmp_path / "full", callbacks=[whole], **epochs)
    assert len(whole.numbers) == 24
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=EVERY, save_top_k=-1)
    with pytest.raises(Killed):
        _run(tmp_path / "a", callbacks=[KillAt(17), checkpoints], **epochs)
    rest = Record(None)
    _run(tmp_path / "b", callbacks=[rest], ckpt_path=next((tmp_path / "ckpt").glob("*step=15.ckpt")), **epochs)
    assert rest.numbers == whole.numbers[15:]  # epoch 1 from its 4th batch, not from its first


def test_a_run_that_ended_at_max_steps_mid_epoch_resumes_there_with_a_larger_max_steps(tmp_path):
    # Lightning counts an epoch that max_steps cut short as finished; without reopen_cut_epoch the resumed
    # run started epoch 1 and never saw the rest of epoch 0 (here batches 8-12 of 12).
    constant = {"scheduler": "constant", "warmup_ratio": 0.0}  # the same learning rates whatever max_steps is
    whole = Record(None)
    full = _run(tmp_path / "full", True, [whole], **constant)
    first, rest = Record(None), Record(None)
    _run(tmp_path / "a", True, [first, AdapterCheckpoint(dirpath=tmp_path / "ckpt")], steps=7, **constant)
    resumed = _run(tmp_path / "b", True, [rest], ckpt_path=tmp_path / "ckpt" / "last.ckpt", **constant)
    assert first.numbers + rest.numbers == whole.numbers
    for key, value in adapter_state_dict(full.model).items():
        torch.testing.assert_close(adapter_state_dict(resumed.model)[key], value, rtol=0, atol=0, msg=key)


def test_a_changed_batch_size_restarts_the_epoch_with_a_warning():
    sampler = LengthGroupedSampler([5] * 8, batch_size=2, num_replicas=1, rank=0)
    loader = ResumableDataLoader(list(range(8)), batch_size=2, sampler=sampler, position=lambda: (0, 3))
    state = loader.state_dict()
    assert state == {
        "epoch": 0,
        "batches": 3,
        "batch_size": 2,
        "max_tokens_per_batch": None,
        "pack_to_multiple_of": None,
        "num_replicas": 1,
        "examples": 8,
        "seed": 0,
    }
    other = ResumableDataLoader(
        list(range(8)), batch_size=4, sampler=LengthGroupedSampler([5] * 8, batch_size=4, num_replicas=1, rank=0)
    )
    with pytest.warns(UserWarning, match=r"batch_size 2 -> 4\): epoch 0 restarts from its first batch"):
        other.load_state_dict(state)
    assert len(list(other)) == 2  # the whole epoch
    loader.load_state_dict(state)
    assert len(list(loader)) == 1  # batches 4 of 4: the rest of the epoch
    assert len(loader) == 4  # Lightning counts the epoch's batches on from the checkpoint's


def test_resumable_loader_needs_the_resumable_sampler():
    with pytest.raises(TypeError, match="needs a LengthGroupedSampler, got SequentialSampler"):
        ResumableDataLoader(list(range(4)), batch_size=2)


class CountSaves(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("max_steps", "expected"), [(7, [3, 5, 6, 7]), (6, [3, 5, 6])])
def test_adapter_checkpoint_saves_every_n_steps_after_validation_and_at_the_end(tmp_path, max_steps, expected):
    # Lightning's ModelCheckpoint(every_n_train_steps=3, save_last=True) alone would save at 3 and 6 only:
    # not after the validation at step 5, and not the final step 7.
    from lightning_helpers import RandomTokensData

    from lit_svd.callbacks import AdapterCheckpoint

    saves = CountSaves()
    module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))
    trainer = quiet_cpu_trainer(
        tmp_path,
        max_steps,
        val_check_interval=5,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        enable_checkpointing=True,
        callbacks=[SVDInit(), AdapterCheckpoint(every_n_train_steps=3, dirpath=tmp_path / "ckpt"), saves],
    )
    trainer.fit(module, datamodule=RandomTokensData(count=40, batch_size=2))
    assert saves.steps == expected
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == max_steps


def test_adapter_checkpoint_refuses_a_negative_interval():
    from lit_svd.callbacks import AdapterCheckpoint

    with pytest.raises(ValueError, match="every_n_train_steps must be >= 0, got -1"):
        AdapterCheckpoint(every_n_train_steps=-1)


class TermAt(L.Callback):
    """Sends this process SIGTERM after step ``step``, as a preempting scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_that_resumes_like_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_svd.callbacks import AdapterCheckpoint

    whole = Record(None)
    full = _run(tmp_path / "full", True, [whole])
    first = Record(None)
    with pytest.raises(SIGTERMException):
        _run(tmp_path / "a", True, [first, TermAt(7), AdapterCheckpoint(every_n_train_steps=0, dirpath=tmp_path / "c")])
    assert len(first.numbers) == 7  # the step under way when the signal came was finished, no further one
    assert torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)["global_step"] == 7
    rest = Record(None)
    resumed = _run(tmp_path / "b", True, [rest], ckpt_path=tmp_path / "c" / "last.ckpt")
    assert rest.numbers == whole.numbers[7:]
    for key, value in adapter_state_dict(full.model).items():
        torch.testing.assert_close(adapter_state_dict(resumed.model)[key], value, rtol=0, atol=0, msg=key)


# ----- non-finite values ----------------------------------------------------------------------------------------------
class NaNLossAt(LitSVDAdapter):
    """The loss of optimizer step ``bad_step`` is NaN (as after an overflow or a corrupt batch)."""

    bad_step = 3

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * float("nan") if self.trainer.global_step == self.bad_step else loss


def _nan_run(root, on_nonfinite: str):
    L.seed_everything(3)
    module = NaNLossAt(
        make_tiny_model("llama"),
        AdapterConfig(method="sorsa", rank=4, target_modules=TINY_TARGETS["llama"]),
        learning_rate=1e-2,
        on_nonfinite=on_nonfinite,
    )
    trainer = quiet_cpu_trainer(
        root,
        6,
        limit_val_batches=0,
        enable_checkpointing=True,
        gradient_clip_val=1.0,
        callbacks=[
            SVDInit(),
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True),
        ],
    )
    data = NumberedExamples(batch_size=BATCH, max_length=16, seed=7)
    return module, trainer, data


def test_a_nan_loss_stops_the_run_naming_step_loss_and_parameter_and_keeps_the_last_checkpoint(tmp_path):
    module, trainer, data = _nan_run(tmp_path, "error")
    with pytest.raises(
        FloatingPointError,
        match=r"step 3: non-finite gradient \(loss nan; first parameter affected: "
        r"model\.model\.layers\.0\.self_attn\.q_proj\.(U|S|V)\)",
    ):
        trainer.fit(module, datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3  # the last good step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in adapter_state_dict(module.model).values())  # no step taken


def test_the_error_names_the_parameter_whose_gradient_is_not_finite_although_clipping_spreads_it(tmp_path):
    """One NaN in one gradient: clipping (on here) turns every gradient into NaN, so the parameter can only be
    named from a verdict taken before the clip."""
    module, trainer, data = _nan_run(tmp_path, "error")
    module.bad_step = -1  # the loss stays finite
    target = "model.model.layers.1.mlp.down_proj.S"

    class InfIn(L.Callback):
        def on_before_optimizer_step(self, run, pl_module, optimizer):
            if run.global_step == 2:
                dict(pl_module.named_parameters())[target].grad[0] = float("nan")

    trainer.callbacks.append(InfIn())
    with pytest.raises(
        FloatingPointError, match=rf"step 2: .*first parameter affected: {target.replace('.', '[.]')}\)"
    ):
        trainer.fit(module, datamodule=data)
    assert all(torch.isfinite(v).all() for v in adapter_state_dict(module.model).values())  # no step taken


def test_a_nan_step_can_be_skipped_and_counted(tmp_path):
    module, trainer, data = _nan_run(tmp_path, "skip")
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, run, pl_module, batch, batch_idx):
            if run.global_step in (3, 4):
                before[run.global_step] = {k: v.clone() for k, v in adapter_state_dict(pl_module.model).items()}

    trainer.callbacks.append(Snapshot())
    with pytest.warns(UserWarning, match=r"step 3: non-finite gradient \(loss nan\); the update is skipped"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6 and module.skipped_steps == 1
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    for key, value in before[3].items():  # the skipped step changed nothing
        torch.testing.assert_close(before[4][key], value, rtol=0, atol=0, msg=key)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["lit_svd"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_checkpoint_with_non_finite_adapter_tensors_is_refused(tmp_path):
    module = LitSVDAdapter(make_tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))
    trainer = quiet_cpu_trainer(tmp_path, 1, limit_val_batches=0)
    trainer.fit(module, datamodule=NumberedExamples(batch_size=BATCH, max_length=16))
    with torch.no_grad():
        next(p for n, p in module.named_parameters() if n.endswith(".B")).fill_(float("inf"))
    with pytest.raises(
        ValueError,
        match=r"not writing a checkpoint at step 1: non-finite adapter tensor\(s\) "
        r"model\.layers\.0\.self_attn\.q_proj\.B",
    ):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
