"""`RunSummary`: what a run did, printed at its end and written to ``summary.json`` in the run folder.

Also `ParameterSummary`, a two-line replacement for Lightning's model-summary table (whose FLOPs column
reads 0 for a model without an example input).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from typing_extensions import override

from lit_svd.data import non_padding_tokens

__all__ = ["ParameterSummary", "RunSummary", "wilson_interval"]

_Z95 = 1.959963984540054  # standard normal quantile of 0.975


def wilson_interval(correct: int, total: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default).

    Unlike the normal approximation ``p ± z·sqrt(p(1−p)/n)`` it stays inside [0, 1] and is not of
    width zero at 0/n or n/n, which matters for the small evaluation sets of short runs.

    Args:
        correct: Successes ``k``.
        total: Trials ``n`` (``0`` gives ``(nan, nan)``).
        z: Normal quantile of the two-sided level.

    Returns:
        ``(low, high)`` as fractions.
    """
    if total <= 0:
        return math.nan, math.nan
    p = correct / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / total + z2n / (4 * total)) / (1 + z2n)
    # At 0/n and n/n the bound is exactly 0 / 1; rounding would put the estimate outside its interval.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def process_start_time() -> float:
    """Wall-clock time (``time.time()``) at which this process started; the import time of this module where
    ``/proc`` is unavailable."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of proc(5), "starttime": clock ticks after boot
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def _number(value: Any) -> float | None:
    """A logged value (tensor or number) as a float; ``None`` when absent."""
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class RunSummary(Callback):
    """At the end of ``fit`` / ``validate`` / ``test``: one block of text and ``summary.json`` in the run folder.

    The summary holds the optimizer steps, training tokens/s (non-padding tokens over the training time,
    validation excluded), the SVD initialisation time (``SVDInit.report``), the last training loss, the
    last evaluation's loss and accuracy with the number of examples and a 95 % Wilson interval (per task
    for multi-task metrics), the final spectral metrics (``SpectralMonitor``), and the paths of the
    checkpoint, TensorBoard run and saved config, followed by the commands to look at them. Everything is
    read from public state: ``trainer.callback_metrics``, the module's accuracy ``metric`` (counts are
    taken, synchronised across ranks, just before the module computes and resets it), and the other
    callbacks. Only global rank 0 prints and writes.

    Example::

        trainer = Trainer(callbacks=[SVDInit(), SpectralMonitor(), RunSummary()])
        trainer.fit(module, datamodule=dm)
        trainer.callbacks[-1].summary["eval"]["val"]["accuracy"]    # {"accuracy": …, "n": …, "ci95": […]}

    Args:
        filename: Name of the JSON file written into ``trainer.log_dir`` (``None``: none).
        print_summary: Print the text block on global rank 0.

    Attributes:
        defer: When ``True`` the hooks only collect; the owner calls :meth:`finish` itself (``LitSVDCLI``
            does, after it has written the exports, so their paths are part of the summary).
        summary: The last summary (``None`` before the first end of a stage).
    """

    def __init__(
        self, filename: str | None = "summary.json", print_summary: bool = True, warmup_steps: int = 5
    ) -> None:
        if filename is not None and (not filename or Path(filename).name != filename):
            raise ValueError(f"filename must be a plain file name (written into the run folder) or None: {filename!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.filename = filename
        self.print_summary = print_summary
        self.warmup_steps = warmup_steps
        self.defer = False
        self.summary: dict[str, Any] | None = None
        self._process_started = process_start_time()
        self._marks: dict[str, float] = {}
        self._reset_fit()
        self._eval_counts: dict[str, dict[str, tuple[int, int]]] = {}

    def _reset_fit(self) -> None:
        self._tokens: torch.Tensor | int = 0
        self._steady_tokens: torch.Tensor | int = 0
        self._batches = 0
        self._steady_seconds = 0.0
        self._last_batch_end: float | None = None
        self._train_seconds = 0.0
        self._train_started: float | None = None
        self._validation_started: float | None = None
        self._checkpoint_started: float | None = None
        self._seconds = {"validation": 0.0, "checkpoints": 0.0}

    def _mark(self, name: str) -> None:
        """Record when ``name`` happened, in seconds after the process started."""
        self._marks[name] = time.time() - self._process_started

    def _checkpoint_written(self) -> None:
        # on_save_checkpoint runs before the file is written; the next hook we see runs after it.
        if self._checkpoint_started is not None:
            self._seconds["checkpoints"] += time.perf_counter() - self._checkpoint_started
            self._checkpoint_started = None

    # ----- collecting -----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._mark("setup")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_fit()
        self._mark("train_start")
        self._train_started = self._last_batch_end = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._checkpoint_written()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        # Stays a device tensor until the end: a host sync per step would stall the GPU queue.
        tokens = non_padding_tokens(batch)
        self._tokens = self._tokens + tokens
        self._batches += 1
        # Steady state: batch-to-batch intervals after the warm-up (allocator, kernels' autotuning, graph
        # captures), leaving out any interval with a validation or a checkpoint write in it.
        if self._batches > self.warmup_steps * trainer.accumulate_grad_batches and self._last_batch_end is not None:
            self._steady_seconds += now - self._last_batch_end
            self._steady_tokens = self._steady_tokens + tokens
        self._last_batch_end = now

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._checkpoint_started is None:  # several files in a row (top-k and last) count as one write
            self._checkpoint_started = time.perf_counter()
        self._last_batch_end = None

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_written()
        self._validation_started = time.perf_counter()
        self._last_batch_end = None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation inside fit is not training time; the SVD init (on_fit_start) is outside it already.
        if self._validation_started is not None:
            seconds = time.perf_counter() - self._validation_started
            self._seconds["validation"] += seconds
            if self._train_started is not None:
                self._train_seconds -= seconds
        self._validation_started = None
        if trainer.state.fn == TrainerFn.VALIDATING and not self.defer:
            self.finish(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_written()
        self._mark("train_end")
        if self._train_started is not None:
            self._train_seconds += time.perf_counter() - self._train_started - self._seconds["checkpoints"]
            self._train_started = None
        # Every rank calls this (a collective); all ranks' tokens count towards the throughput.
        counts = torch.stack([torch.as_tensor(t).long().cpu() for t in (self._tokens, self._steady_tokens)])
        total, steady = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").tolist()
        self._tokens, self._steady_tokens = int(total), int(steady)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._count(pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._count(pl_module, "test")

    def _count(self, pl_module: LightningModule, stage: str) -> None:
        """``(correct, total)`` per task of the module's accuracy metric, summed over ranks.

        Callbacks' ``on_*_epoch_end`` run before the module's, which computes and resets the metric.
        """
        metric = getattr(pl_module, "metric", None)
        if metric is None or not hasattr(metric, "correct") or not hasattr(metric, "total"):
            return
        with metric.sync_context():  # a collective under DDP; every rank runs this hook
            correct, total = metric.correct.tolist(), metric.total.tolist()
        tasks = list(getattr(metric, "tasks", [])) or [str(i) for i in range(len(total))]
        self._eval_counts[stage] = {task: (int(c), int(n)) for task, c, n in zip(tasks, correct, total, strict=True)}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_written()
        self._mark("fit_end")
        if not self.defer:
            self.finish(trainer)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.defer:
            self.finish(trainer)

    # ----- the summary ------------------------------------------------------------------------------------------
    def collect(self, trainer: Trainer) -> dict[str, Any]:
        """The summary of the stage that just ended, as a JSON-ready dict."""
        metrics = trainer.callback_metrics
        stage = {TrainerFn.FITTING: "fit", TrainerFn.VALIDATING: "validate", TrainerFn.TESTING: "test"}.get(
            trainer.state.fn, str(trainer.state.fn)
        )
        summary: dict[str, Any] = {"stage": stage, "steps": trainer.global_step}
        if stage == "fit":
            tokens = int(self._tokens) if not isinstance(self._tokens, torch.Tensor) else int(self._tokens.sum())
            seconds = self._train_seconds
            steady = self._steady_tokens if isinstance(self._steady_tokens, int) else int(self._steady_tokens.sum())
            summary |= {
                "train_seconds": round(seconds, 3),
                "train_tokens": tokens,
                "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
                "steady_tokens_per_second": round(steady / self._steady_seconds, 1)
                if self._steady_seconds > 0
                else None,
                "warmup_steps": self.warmup_steps,
                "svd_init_seconds": self._svd_init_seconds(trainer),
                "train_loss": _number(metrics.get("train/loss")),
            }
        summary["seconds"] = self._timeline(stage, summary.get("svd_init_seconds"))
        summary["eval"] = self._evaluations(metrics)
        summary["spectral"] = self._spectral(trainer)
        summary["paths"] = self._paths(trainer)
        summary["commands"] = [f"tensorboard --logdir {shlex.quote(summary['paths']['run_dir'])}"]
        return summary

    def finish(
        self,
        trainer: Trainer,
        paths: dict[str, Any] | None = None,
        exports: dict[str, str] | None = None,
        commands: list[str] | None = None,
        seconds: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Collect, write ``summary.json`` and print it (global rank 0 only).

        Args:
            trainer: The trainer whose stage just ended.
            paths: More paths to record (e.g. ``{"checkpoint": …}`` of a checkpoint that was evaluated).
            exports: Written exports, label → folder (e.g. ``{"merged model": "out/merged"}``).
            commands: Commands to show after ``tensorboard --logdir …``.
            seconds: More phases' wall seconds for the timeline (e.g. ``{"export": 12.5}``).

        Returns:
            The summary dict (also kept in ``self.summary``).
        """
        summary = self.collect(trainer)
        summary["paths"].update(paths or {})
        if exports:
            summary["paths"]["exports"] = dict(exports)
        summary["commands"] += list(commands or [])
        total = summary["seconds"].pop("total")
        summary["seconds"] |= {name: round(value, 2) for name, value in (seconds or {}).items()}
        summary["seconds"]["total"] = total
        if self.filename is not None:
            summary["paths"]["summary"] = str(Path(summary["paths"]["run_dir"]) / self.filename)
        self.summary = summary
        if trainer.is_global_zero:
            if self.filename is not None:
                path = Path(summary["paths"]["summary"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(summary, indent=2) + "\n")
            if self.print_summary:
                print(render_summary(summary), flush=True)
        return summary

    def _timeline(self, stage: str, svd_init_seconds: float | None) -> dict[str, float]:
        """Where the run's wall time went, in seconds: ``startup`` (process start → trainer setup: imports,
        configuration, model loading); for ``fit``: ``setup`` (→ first training step: data preparation,
        device placement, the SVD init, sharding, the sanity check), ``svd_init`` (the part of ``setup`` spent
        in the SVD init), ``training`` (steps only), ``checkpoints`` (writing them); ``validation``;
        ``total`` (process start → now). The process start is read from ``/proc``, to about 1 s."""
        marks = self._marks
        timeline: dict[str, float] = {}
        if "setup" in marks:
            timeline["startup"] = marks["setup"]
        if stage == "fit" and "train_start" in marks:
            timeline["setup"] = marks["train_start"] - marks.get("setup", 0.0)
            if svd_init_seconds is not None:
                timeline["svd_init"] = svd_init_seconds
            timeline["training"] = self._train_seconds
            timeline["checkpoints"] = self._seconds["checkpoints"]
        if self._seconds["validation"]:
            timeline["validation"] = self._seconds["validation"]
        timeline["total"] = time.time() - self._process_started
        return {name: round(value, 2) for name, value in timeline.items()}

    @staticmethod
    def _svd_init_seconds(trainer: Trainer) -> float | None:
        for callback in trainer.callbacks:
            report = getattr(callback, "report", None)
            if type(callback).__name__ == "SVDInit" and isinstance(report, dict) and "seconds" in report:
                return round(float(report["seconds"]), 3)
        return None  # no SVDInit, or adapters restored from a checkpoint (no init ran)

    def _evaluations(self, metrics: dict[str, Any]) -> dict[str, Any]:
        evaluations: dict[str, Any] = {}
        for stage in ("val", "test"):
            entry: dict[str, Any] = {}
            if f"{stage}/loss" in metrics:
                entry["loss"] = _number(metrics[f"{stage}/loss"])
            counts = self._eval_counts.get(stage, {})
            if len(counts) == 1:
                ((correct, total),) = counts.values()
                entry["accuracy"] = _accuracy(correct, total)
            elif counts:
                per_task = {task: _accuracy(c, n) for task, (c, n) in counts.items() if n > 0}
                seen = [v["accuracy"] for v in per_task.values()]
                entry["accuracy"] = {"average": sum(seen) / len(seen) if seen else None, "tasks": per_task}
            elif f"{stage}/accuracy" in metrics:  # a metric without counts: the value only
                entry["accuracy"] = {"accuracy": _number(metrics[f"{stage}/accuracy"])}
            if entry:
                evaluations[stage] = entry
        return evaluations

    @staticmethod
    def _spectral(trainer: Trainer) -> dict[str, float]:
        """Mean and max over layers of each ``SpectralMonitor`` metric at its last measurement."""
        for callback in trainer.callbacks:
            spectra = getattr(callback, "last_spectra", None)
            names = getattr(callback, "METRICS", ())
            if spectra and names:
                values = {name: [float(getattr(s, name)) for s in spectra.values()] for name in names}
                return {
                    f"{name}_{kind}": round(fn(v), 6)
                    for name, v in values.items()
                    if v and all(math.isfinite(x) for x in v)
                    for kind, fn in (("mean", lambda x: sum(x) / len(x)), ("max", max))
                }
        metrics = trainer.callback_metrics
        prefix = "spectral/"
        return {k.removeprefix(prefix): round(_number(v), 6) for k, v in metrics.items() if k.startswith(prefix)}

    @staticmethod
    def _paths(trainer: Trainer) -> dict[str, Any]:
        run_dir = trainer.log_dir if trainer.logger is not None else trainer.default_root_dir
        paths: dict[str, Any] = {"run_dir": str(run_dir)}
        checkpoints = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
        checkpoints = [c for c in checkpoints if c]
        if checkpoints:
            paths["checkpoint"] = checkpoints[0]
        for callback in trainer.callbacks:
            # LightningCLI's SaveConfigCallback writes the full config next to the logs.
            filename = getattr(callback, "config_filename", None)
            if isinstance(filename, str) and (Path(run_dir) / filename).is_file():
                paths["config"] = str(Path(run_dir) / filename)
        return paths


def _accuracy(correct: int, total: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, total)
    return {
        "accuracy": correct / total if total else None,
        "correct": correct,
        "n": total,
        "ci95": [round(low, 4), round(high, 4)] if total else None,
    }


def _format_accuracy(entry: dict[str, Any]) -> str:
    if entry.get("n") is None:
        value = entry.get("accuracy")
        return "n/a" if value is None else f"{100 * value:.2f} %"
    if not entry["n"]:
        return "no examples"
    low, high = entry["ci95"]
    return (
        f"{100 * entry['accuracy']:.2f} % ({entry['correct']}/{entry['n']}; "
        f"95 % interval {100 * low:.1f}–{100 * high:.1f} %, Wilson)"
    )


def render_summary(summary: dict[str, Any]) -> str:
    """The text block of a summary dict (what ``RunSummary`` prints)."""
    rows: list[tuple[str, str]] = []
    if summary["stage"] == "fit":
        rate, steady = summary.get("tokens_per_second"), summary.get("steady_tokens_per_second")
        throughput = ""
        if rate:
            after = f"; {steady:,.0f} after {summary['warmup_steps']} warm-up steps" if steady else ""
            throughput = f" ({rate:,.0f} tokens/s{after})"
        rows.append(
            (
                "steps",
                f"{summary['steps']} optimizer steps, {summary['train_tokens']:,} tokens in "
                f"{summary['train_seconds']:.1f} s{throughput}",
            )
        )
        init = summary.get("svd_init_seconds")
        rows.append(("SVD init", "not run (adapters were restored)" if init is None else f"{init:.2f} s"))
        loss = summary.get("train_loss")
        rows.append(("train loss", "n/a" if loss is None else f"{loss:.4f} (last step)"))
    for stage, entry in summary["eval"].items():
        name = {"val": "validation", "test": "test"}[stage]
        if entry.get("loss") is not None:
            rows.append((f"{name} loss", f"{entry['loss']:.4f}"))
        accuracy = entry.get("accuracy")
        if accuracy is None:
            continue
        if "tasks" in accuracy:
            average = accuracy["average"]
            value = "n/a" if average is None else f"{100 * average:.2f} % (average over tasks)"
            rows.append((f"{name} accuracy", value))
            rows += [(f"  {task}", _format_accuracy(value)) for task, value in accuracy["tasks"].items()]
        else:
            rows.append((f"{name} accuracy", _format_accuracy(accuracy)))
    timeline = dict(summary.get("seconds") or {})
    if "total" in timeline:
        total = timeline.pop("total")
        init = timeline.pop("svd_init", None)
        parts = [
            f"{name} {value:.1f} s" + (f" (SVD init {init:.1f} s)" if name == "setup" and init is not None else "")
            for name, value in timeline.items()
        ]
        rows.append(("time", f"{total:.0f} s in all: " + ", ".join(parts)))
    spectral = summary.get("spectral") or {}
    if spectral:
        preferred = ("sv_drift_max", "sv_drift_mean", "orth_U_max", "orth_V_max", "weight_change_max")
        shown = [k for k in preferred if k in spectral]
        rows.append(("spectral", ", ".join(f"{k} {spectral[k]:.3g}" for k in shown or sorted(spectral))))
    paths = summary["paths"]
    labels = {"checkpoint": "checkpoint", "run_dir": "TensorBoard run", "config": "config", "summary": "summary"}
    for key, label in labels.items():
        if key in paths:
            rows.append((label, paths[key]))
    for name, path in paths.get("exports", {}).items():
        rows.append((name, path))
    width = max(len(label) for label, _ in rows)
    title = f" run summary ({summary['stage']}) "
    lines = [title.center(width + 50, "─")]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    if summary.get("commands"):
        lines.append("next:")
        lines += [f"  {command}" for command in summary["commands"]]
    return "\n".join(lines)


class ParameterSummary(ModelSummary):
    """Lightning's model summary in two lines: total and trainable parameters (no per-module table).

    Lightning's table has a FLOPs column that reads 0 unless the module defines ``example_input_array``;
    what matters for an adapter run is the share of parameters that trains.

    Example::

        trainer = Trainer(callbacks=[ParameterSummary()])   # replaces the default summary
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = dict(summary_data)
        names, types = columns.get("Name", []), columns.get("Type", [])
        modules = ", ".join(f"{name} ({kind})" for name, kind in zip(names, types, strict=False))
        share = 100 * trainable_parameters / total_parameters if total_parameters else 0.0
        rank_zero_info(
            f"model: {modules}; {get_human_readable_count(total_parameters)} parameters ({model_size:.1f} MB)\n"
            f"trainable: {get_human_readable_count(trainable_parameters)} ({share:.2f} %), "
            f"frozen: {get_human_readable_count(total_parameters - trainable_parameters)}"
        )
