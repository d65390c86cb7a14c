"""`AdapterCheckpoint`: one ``last.ckpt`` kept current every N steps, after each validation and at the end."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["AdapterCheckpoint", "reopen_cut_epoch"]


def reopen_cut_epoch(trainer: Trainer, checkpoint: dict) -> bool:
    """Record an epoch that ``max_steps`` (or a stop request) cut short as unfinished in ``checkpoint``.

    When a fit stops before its training loader is exhausted, Lightning still counts the epoch as completed;
    a checkpoint written then makes a run resumed with a larger ``max_steps`` start the next epoch, and the
    rest of this epoch's batches are never seen. Rewritten here as the mid-epoch checkpoint it is (epoch
    started, not completed; the data loader's place: this epoch, the batches done), the resumed run continues
    with exactly the batches an uninterrupted run would see. Returns whether the checkpoint was changed.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if fit is None or "epoch_progress" not in fit:
        return False
    batches = trainer.fit_loop.epoch_loop.batch_progress
    epoch = fit["epoch_progress"]["current"]
    finished_epoch = epoch["completed"] == epoch["started"] and epoch["completed"] > 0
    total = trainer.num_training_batches
    if not finished_epoch or batches.is_last_batch or not 0 < batches.current.processed < total:
        return False
    for part in ("total", "current"):
        fit["epoch_progress"][part]["processed"] -= 1
        fit["epoch_progress"][part]["completed"] -= 1
    for state in fit.get("state_dict", {}).get("combined_loader", None) or []:
        if isinstance(state, dict) and {"epoch", "batches"} <= state.keys():  # ResumableDataLoader's place
            state["epoch"] -= 1
    return True


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps a single resumable ``last.ckpt`` up to date.

    Lightning's triggers are exclusive: with ``every_n_train_steps`` it no longer saves after validation, and
    at the end of training it saves ``last.ckpt`` only if it never saved one — so a 1,100-step run saving
    every 200 steps would end with step 1,000 in ``last.ckpt``. This one writes ``last.ckpt`` every
    ``every_n_train_steps`` optimizer steps (a killed run loses at most that many; with ``ResumableDataLoader``
    it resumes mid-epoch with the same batches next), after every validation, and when training ends, never
    twice for one step. No other files (``save_top_k=0``).

    Preemption: on SIGTERM (a cloud GPU taken back, SLURM's ``scancel`` or ``--signal``, Kubernetes)
    Lightning finishes the current step and stops with ``SIGTERMException``; this callback then writes
    ``last.ckpt`` of that step, so a requeued job started with ``--ckpt_path …/last.ckpt`` continues where
    the signal came. A crash by any other exception writes nothing: its state may be half-updated.

    The checkpoint holds what ``LitSVDAdapter`` puts in it — the adapter tensors, their init snapshot, the
    optimizer and scheduler state, the loops' and callbacks' state — never the frozen base model.

    For other policies (top-k by a metric, one file per epoch) use Lightning's ``ModelCheckpoint``.

    Args:
        every_n_train_steps: Optimizer steps between saves (``0``: only after validation and at the end).
        dirpath: Folder of ``last.ckpt`` (default: the logger's run folder + ``/checkpoints``).
        verbose: Log each save.
    """

    def __init__(
        self, every_n_train_steps: int = 200, dirpath: str | Path | None = None, verbose: bool = False
    ) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps or None,
            verbose=verbose,
        )

    @override
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # Lightning writes through an fsspec transaction (a temporary file moved into place), so a failed
        # write leaves the previous file as it was; the error says so, and where.
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as error:
            kept = f"the previous {filepath} is intact" if Path(filepath).exists() else "there is no earlier checkpoint"
            step, reason = trainer.global_step, error.strerror or error
            message = f"writing the checkpoint of step {step} to {filepath} failed ({reason}); {kept}"
            raise OSError(error.errno, message) from error

    def _save_last_now(self, trainer: Trainer) -> None:
        # Lightning's own guard: fitting only, no sanity check, not the step already written by any trigger.
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._save_last_now(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_last_now(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException between steps (after the optimizer step, before the next batch).
        if isinstance(exception, SIGTERMException):
            self._save_last_now(trainer)
            step = trainer.global_step
            rank_zero_info(f"SIGTERM: saved {self.last_model_path} at step {step}; resume with --ckpt_path")
