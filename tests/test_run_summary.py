"""RunSummary: the end-of-run block and summary.json from a tiny CPU run; one checkpoint file per save."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import make_tiny_model
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_helpers import RandomTokens, RandomTokensData, quiet_cpu_trainer
from torch.utils.data import DataLoader

from lit_svd import AdapterConfig, LitSVDAdapter, RunSummary, SpectralMonitor, SVDInit
from lit_svd.callbacks import ParameterSummary, wilson_interval
from lit_svd.callbacks.run_summary import render_summary
from lit_svd.eval import ChoiceAccuracy, GSM8KAccuracy


# ----- the Wilson interval --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("correct", "total", "expected"),
    [  # worked by hand from p̂ ± z·sqrt(p̂(1−p̂)/n + z²/4n²), shifted and divided by 1 + z²/n (z = 1.959964)
        (0, 10, (0.0, 0.27753)),
        (5, 10, (0.23659, 0.76341)),
        (10, 10, (0.72247, 1.0)),
    ],
)
def test_wilson_interval_matches_hand_worked_values(correct, total, expected):
    low, high = wilson_interval(correct, total)
    assert low == pytest.approx(expected[0], abs=1e-5) and high == pytest.approx(expected[1], abs=1e-5)
    assert low <= correct / total <= high


@pytest.mark.parametrize(("correct", "total"), [(1, 3), (6, 8), (225, 3957)])
def test_wilson_interval_matches_the_other_closed_form(correct, total):
    # (2np̂ + z² ± z·sqrt(z² + 4np̂(1 − p̂))) / (2(n + z²)): the same interval written another way
    z, p = 1.959963984540054, correct / total
    root = z * math.sqrt(z * z + 4 * total * p * (1 - p))
    expected = (
        (2 * total * p + z * z - root) / (2 * (total + z * z)),
        (2 * total * p + z * z + root) / (2 * (total + z * z)),
    )
    assert wilson_interval(correct, total) == pytest.approx(expected, rel=1e-12)


def test_wilson_interval_of_no_examples_is_nan():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


# ----- a tiny run with a known accuracy ---------------------------------------------------------------------------
class FixedAnswers(LitSVDAdapter):
    """Generation replaced by a fixed answer ("The answer is 3"), so the accuracy is known in advance."""

    def generate_answers(self, batch):
        return ["The answer is 3"] * len(batch["references"])


class EvalTokens(RandomTokens):
    """Random LM batches that also carry GSM8K-style references (3 of every 4 are "3")."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["reference"] = "3" if i % 4 else "4"
        return item


def _collate(items):
    batch = {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "attention_mask", "labels")}
    batch["references"] = [item["reference"] for item in items]
    return batch


class KnownAccuracyData(RandomTokensData):
    def val_dataloader(self):
        return DataLoader(EvalTokens(8, seed=1), batch_size=4, collate_fn=_collate)


def _module(metric=None) -> FixedAnswers:
    config = AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj", "v_proj"])
    module = FixedAnswers(make_tiny_model("llama"), config, learning_rate=1e-2, warmup_ratio=0.0)
    module.metric = metric or GSM8KAccuracy()
    return module


def test_summary_of_a_tiny_fit(tmp_path, capsys):
    summary = RunSummary()
    trainer = quiet_cpu_trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=4,
        logger=TensorBoardLogger(tmp_path / "runs", name="tiny"),
        enable_checkpointing=True,
        callbacks=[
            SVDInit(),
            SpectralMonitor(every_n_steps=2),
            ModelCheckpoint(save_top_k=0, save_last=True),
            summary,
        ],
    )
    trainer.fit(_module(), datamodule=KnownAccuracyData())

    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    written = json.loads((run_dir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary.summary))  # the file is the summary the callback kept
    assert written["stage"] == "fit" and written["steps"] == 4
    # 4 batches of 4 random sequences of 12 tokens, all non-padding
    assert written["train_tokens"] == 4 * 4 * 12
    assert written["tokens_per_second"] == pytest.approx(written["train_tokens"] / written["train_seconds"], rel=1e-2)
    assert written["svd_init_seconds"] == pytest.approx(trainer.callbacks[0].report["seconds"], abs=1e-3)
    assert written["train_loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-6)
    val = written["eval"]["val"]
    assert val["loss"] == pytest.approx(float(trainer.callback_metrics["val/loss"]), rel=1e-6)
    # references: 6 of the 8 are "3", and every generation says 3
    assert val["accuracy"]["correct"] == 6 and val["accuracy"]["n"] == 8
    assert val["accuracy"]["accuracy"] == pytest.approx(0.75)
    assert val["accuracy"]["ci95"] == pytest.approx([round(v, 4) for v in wilson_interval(6, 8)])
    assert set(written["spectral"]) >= {"sv_drift_max", "sv_drift_mean", "orth_U_max", "weight_change_max"}
    assert written["spectral"]["sv_drift_max"] > 0  # 4 steps at lr 1e-2 moved the singular values
    assert written["paths"]["run_dir"] == str(run_dir)
    assert written["paths"]["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert written["commands"] == [f"tensorboard --logdir {run_dir}"]

    printed = capsys.readouterr().out
    assert "run summary (fit)" in printed
    assert "75.00 % (6/8; 95 % interval" in printed
    assert str(run_dir / "checkpoints" / "last.ckpt") in printed
    assert f"tensorboard --logdir {run_dir}" in printed.splitlines()[-1]


def test_timeline_keeps_checkpoint_writes_and_validation_out_of_the_training_time(tmp_path):
    # A checkpoint write made slow on purpose (0.4 s at each of 3 saves) and a slow validation (0.3 s per
    # batch, 2 batches, 3 times): neither may count as training time or enter the steady-state throughput.
    class SlowWrites(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.4)
            super().save_checkpoint(checkpoint, path, storage_options)

    class SlowValidation(FixedAnswers):
        def validation_step(self, batch, batch_idx):
            time.sleep(0.3)
            return super().validation_step(batch, batch_idx)

    summary = RunSummary(filename=None, print_summary=False, warmup_steps=2)
    trainer = quiet_cpu_trainer(
        tmp_path,
        max_steps=6,
        val_check_interval=2,
        enable_checkpointing=True,
        callbacks=[
            SVDInit(),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True),
            summary,
        ],
        plugins=[SlowWrites()],
    )
    module = SlowValidation(
        make_tiny_model("llama"), AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj"]), warmup_ratio=0.0
    )
    module.metric = GSM8KAccuracy()
    started = time.time()
    trainer.fit(module, datamodule=KnownAccuracyData(count=24))
    wall = time.time() - started
    written = summary.summary
    seconds = written["seconds"]
    assert seconds["checkpoints"] >= 3 * 0.4 and seconds["validation"] >= 3 * 2 * 0.3
    assert seconds["training"] == pytest.approx(written["train_seconds"], abs=0.01)
    # the fit's wall time holds all three phases, each measured apart
    assert seconds["training"] + seconds["checkpoints"] + seconds["validation"] <= wall
    assert seconds["training"] < wall - 3 * 0.4 - 3 * 2 * 0.3
    assert seconds["svd_init"] <= seconds["setup"] and seconds["startup"] > 0
    assert seconds["total"] >= seconds["startup"] + seconds["setup"] + wall - 1.0  # /proc start: ~1 s resolution
    # steady state: the intervals after the 2 warm-up steps without a validation or checkpoint in them
    assert written["steady_tokens_per_second"] is not None
    assert written["train_tokens"] == 6 * 4 * 12
    assert "time" in render_summary(written) and "checkpoints" in render_summary(written)


def test_one_checkpoint_file_per_save(tmp_path):
    # The recipes' ModelCheckpoint(save_top_k=0, save_last=True): after several saves, one file, last.ckpt,
    # holding the latest step (Lightning's default would add an epoch=…-step=….ckpt copy of it).
    trainer = quiet_cpu_trainer(
        tmp_path,
        max_steps=6,
        val_check_interval=2,
        enable_checkpointing=True,
        callbacks=[SVDInit(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)],
    )
    trainer.fit(_module(), datamodule=KnownAccuracyData(count=24))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_multi_task_accuracy_is_reported_per_task(tmp_path):
    class TwoTasks(KnownAccuracyData):
        def val_dataloader(self):
            def collate(items):
                batch = _collate(items)
                batch["task"] = ["boolq", "piqa"] * (len(items) // 2)
                batch["references"] = ["true", "solution1"] * (len(items) // 2)
                return batch

            return DataLoader(EvalTokens(8, seed=1), batch_size=4, collate_fn=collate)

    class SaysTrue(FixedAnswers):
        def generate_answers(self, batch):
            return ["true"] * len(batch["references"])

    config = AdapterConfig(method="lora", rank=2, target_modules=["q_proj"])
    module = SaysTrue(make_tiny_model("llama"), config)
    module.metric = ChoiceAccuracy(["boolq", "piqa"])
    summary = RunSummary(filename=None, print_summary=False)
    trainer = quiet_cpu_trainer(tmp_path, max_steps=2, val_check_interval=2, callbacks=[SVDInit(), summary])
    trainer.fit(module, datamodule=TwoTasks())
    accuracy = summary.summary["eval"]["val"]["accuracy"]
    assert accuracy["tasks"]["boolq"] == {"accuracy": 1.0, "correct": 4, "n": 4, "ci95": pytest.approx([0.5101, 1.0])}
    assert accuracy["tasks"]["piqa"]["correct"] == 0 and accuracy["tasks"]["piqa"]["n"] == 4
    assert accuracy["average"] == pytest.approx(0.5)
    assert "boolq" in render_summary(summary.summary)
    assert not list(tmp_path.rglob("summary.json"))  # filename=None writes nothing


def test_summary_after_test_reports_test_accuracy(tmp_path):
    summary = RunSummary()
    trainer = quiet_cpu_trainer(
        tmp_path, max_steps=1, logger=TensorBoardLogger(tmp_path, name="t"), callbacks=[summary]
    )

    class TestData(KnownAccuracyData):
        def test_dataloader(self):
            return super().val_dataloader()

    trainer.test(_module(), datamodule=TestData())
    written = json.loads((tmp_path / "t" / "version_0" / "summary.json").read_text())
    assert written["stage"] == "test" and "train_loss" not in written
    assert written["eval"]["test"]["accuracy"]["n"] == 8 and written["eval"]["test"]["accuracy"]["correct"] == 6


def test_filename_must_be_a_plain_name():
    with pytest.raises(ValueError, match="plain file name"):
        RunSummary(filename="runs/summary.json")


def test_parameter_summary_prints_two_lines_without_flops(tmp_path, caplog):
    import logging

    trainer = quiet_cpu_trainer(
        tmp_path, max_steps=1, enable_model_summary=True, callbacks=[SVDInit(), ParameterSummary()]
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(_module(), datamodule=KnownAccuracyData())
    text = "\n".join(r.getMessage() for r in caplog.records if "trainable:" in r.getMessage())
    assert "model: model (LlamaForCausalLM)" in text and "trainable: " in text
    assert "FLOPs" not in caplog.text


def test_summary_after_validate_prints_once(tmp_path, capsys):
    summary = RunSummary(filename=None)
    trainer = quiet_cpu_trainer(tmp_path, max_steps=1, callbacks=[summary])
    trainer.validate(_module(), datamodule=KnownAccuracyData())
    assert summary.summary["stage"] == "validate"
    assert summary.summary["eval"]["val"]["accuracy"]["n"] == 8
    assert capsys.readouterr().out.count("run summary (validate)") == 1
