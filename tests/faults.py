"""Fault injection for the kill-and-resume tests: a training run that a signal can end at a chosen point.

``python tests/faults.py ROOT --method M [--kill PHASE:STEP]`` trains a tiny Llama with adapter ``M`` for
``STEPS`` optimizer steps, resuming from ``ROOT/ckpt/last.ckpt`` when it exists, and records each training
batch (``ROOT/batches.txt``: global step and example numbers). ``--kill`` sends the process SIGKILL — no
handler, no clean-up, as the OOM killer or a lost node would — at one of:

    forward            inside the training step of step STEP, before the loss
    optimizer          between the backward and the optimizer step of step STEP
    checkpoint-write   half-way through writing the checkpoint of step STEP
    checkpoint-commit  after the checkpoint of step STEP is written, before it replaces the last one
    validation         inside the validation that follows step STEP

A run that finishes writes ``ROOT/final.pt``: the adapter tensors and the optimizer state.
:func:`train` is the same run in-process (the uninterrupted reference).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TINY_TARGETS, make_tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from lightning_helpers import quiet_cpu_trainer  # noqa: E402

from lit_svd import AdapterConfig, LitSVDAdapter, SVDInit  # noqa: E402
from lit_svd.callbacks import AdapterCheckpoint  # noqa: E402
from lit_svd.data import InstructionDataModule  # noqa: E402
from lit_svd.inject import adapter_state_dict  # noqa: E402

EXAMPLES, BATCH, STEPS, SAVE_EVERY, VALIDATE_EVERY = 24, 2, 16, 3, 5  # 12 batches per epoch: two epochs
PHASES = ("forward", "optimizer", "checkpoint-write", "checkpoint-commit", "validation")
METHODS = ("lora", "pissa", "sorsa", "olora", "osora")


class NumberedExamples(InstructionDataModule):
    """24 training examples whose first token is their number (1…24), of varied lengths, and 4 held out
    for the validation loss; no tokenizer needed."""

    pad_token_id = 0

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            rng = np.random.default_rng(0)
            rows = []
            for number in range(1, EXAMPLES + 5):
                length = int(rng.integers(4, 12))
                rows.append({"input_ids": [number, *rng.integers(30, 100, length - 1).tolist()], "prompt_length": 2})
                rows[-1]["length"] = length
            self.train_dataset = Dataset.from_list(rows[:EXAMPLES])
            self.val_dataset = Dataset.from_list(rows[EXAMPLES:])

    def make_metric(self):
        return None


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Record(L.Callback):
    """Appends ``global_step numbers…`` for every training batch to a file (flushed, so it survives a kill)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.batches: list[tuple[int, list[int]]] = []

    @property
    def numbers(self) -> list[list[int]]:
        """The example numbers of each batch, in order."""
        return [numbers for _, numbers in self.batches]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        entry = (trainer.global_step, batch["input_ids"][:, 0].tolist())
        self.batches.append(entry)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(" ".join(map(str, [entry[0], *entry[1]])) + "\n")


class Killed(Exception):
    """What :class:`KillAt` raises: a fit stopped in the same process, for tests that resume it there."""


class KillAt(L.Callback):
    """Raise :class:`Killed` at the start of the batch of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


class Kill(L.Callback):
    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step
        if phase.startswith("checkpoint"):
            self._arm_checkpoint_write()

    def _arm_checkpoint_write(self) -> None:
        # Lightning writes checkpoints through an fsspec transaction: a temporary file, moved into place on
        # commit. The kill lands in that file's write, or between the write and the move.
        from fsspec.implementations.local import LocalFileOpener

        kill = self
        write, commit = LocalFileOpener.write, LocalFileOpener.commit

        def half_write(opener, data):
            if kill.armed and kill.phase == "checkpoint-write":
                write(opener, data[: len(data) // 2])
                opener.flush()
                kill_now()
            return write(opener, data)

        def killed_commit(opener):
            if kill.armed and kill.phase == "checkpoint-commit":
                kill_now()
            return commit(opener)

        LocalFileOpener.write, LocalFileOpener.commit = half_write, killed_commit

    armed = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        Kill.armed = self.phase.startswith("checkpoint") and trainer.global_step + 1 == self.step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.phase == "optimizer" and trainer.global_step + 1 == self.step:
            kill_now()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.phase == "validation" and trainer.global_step == self.step and not trainer.sanity_checking:
            kill_now()


class KillableModule(LitSVDAdapter):
    kill_at_forward: int | None = None

    def training_step(self, batch, batch_idx):
        if self.kill_at_forward is not None and self.trainer.global_step + 1 == self.kill_at_forward:
            kill_now()
        return super().training_step(batch, batch_idx)


def base_model(name: str):
    """``"tiny"``: a random tiny Llama; ``"smollm2"``: the real SmolLM2-135M-Instruct (float32)."""
    if name == "smollm2":
        from lit_svd.models import EMBEDDED_MODEL, load_causal_lm

        return load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32)
    return make_tiny_model("llama")


def train(
    root: Path,
    method: str,
    kill: tuple[str, int] | None = None,
    record_file: Path | None = None,
    model: str = "tiny",
):
    """One run (resumed from ``root/ckpt/last.ckpt`` if present); returns ``(module, trainer, record)``."""
    L.seed_everything(5)
    config = AdapterConfig(method=method, rank=4, target_modules=TINY_TARGETS["llama"], dropout=0.0)
    learning_rate = 1e-2 if model == "tiny" else 1e-4
    module = KillableModule(base_model(model), config, learning_rate=learning_rate, warmup_ratio=0.1)
    record = Record(record_file)
    callbacks = [SVDInit(), AdapterCheckpoint(every_n_train_steps=SAVE_EVERY, dirpath=root / "ckpt"), record]
    if kill is not None:
        phase, step = kill
        if phase == "forward":
            module.kill_at_forward = step
        else:
            callbacks.append(Kill(phase, step))
    trainer = quiet_cpu_trainer(
        root,
        STEPS,
        val_check_interval=VALIDATE_EVERY,
        check_val_every_n_epoch=None,  # every VALIDATE_EVERY batches counted across epochs, as in the recipes
        limit_val_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    data = NumberedExamples(batch_size=BATCH, max_length=16, seed=9, val_size=4, eval_batch_size=2)
    last = root / "ckpt" / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=last if last.exists() else None)
    return module, trainer, record


def final_state(module: LitSVDAdapter, trainer) -> dict:
    """The adapter tensors and the optimizer's state (what a resumed run must reproduce)."""
    optimizer = trainer.optimizers[0].state_dict()
    return {"adapter": adapter_state_dict(module.model), "optimizer": optimizer["state"], "step": trainer.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--kill", help="PHASE:STEP")
    parser.add_argument("--model", default="tiny", choices=("tiny", "smollm2"))
    args = parser.parse_args()
    kill = None
    if args.kill:
        phase, step = args.kill.split(":")
        if phase not in PHASES:
            raise SystemExit(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
        kill = (phase, int(step))
    args.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the same reductions in every process, and in the in-process reference
    module, trainer, _ = train(args.root, args.method, kill, args.root / "batches.txt", args.model)
    torch.save(final_state(module, trainer), args.root / "final.pt")


if __name__ == "__main__":
    main()
