"""Where a recipe's training step spends its time, on the host and on the GPU, phase by phase.

A Lightning callback for benchmarks: at each hook of the training step it notes the host clock and records a
CUDA event on the current stream, then reports per phase the mean host time and the mean GPU time between
the events (over the steps after ``skip`` warm-up steps). A phase whose GPU time equals its host time while
the host is doing something else than waiting for the GPU is a phase in which the GPU idles, waiting for
the host to queue work.

Phases (Lightning's order of hooks within one optimizer step; the forward runs inside the optimizer's
closure, before ``zero_grad`` and the backward):

    forward      on_train_batch_start      -> on_before_zero_grad
    zero_grad    on_before_zero_grad       -> on_before_backward
    backward     on_before_backward        -> on_after_backward     (DDP: + the gradient all-reduce's wait)
    pre_step     on_after_backward         -> on_before_optimizer_step
    step         on_before_optimizer_step  -> on_train_batch_end    (finite check, clipping, L_orth, AdamW)
    between      on_train_batch_end        -> next on_train_batch_start (loop, logging, next batch)

``STEP_TIMELINE_NO_CUDNN_SDPA=1`` turns cuDNN attention off for the whole process at the start of fit.
``STEP_TIMELINE_SYNCS=1`` counts the host synchronisations PyTorch reports (``torch.cuda.set_sync_debug_mode``)
after the warm-up steps, per phase and per line of code outside torch that caused them (distributed
collectives are not covered by PyTorch's report).

Usage (bench/ on PYTHONPATH; one JSON per rank written at the end of fit):
    STEP_TIMELINE_OUT=/tmp/tl lightning run ... recipes/gsm8k_sorsa.py fit ... \\
        --trainer.callbacks+=step_timeline.StepTimeline
"""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import device_profiler, top_operators

PHASES = ("forward", "zero_grad", "backward", "pre_step", "step", "between")
MARKS = ("batch_start", "before_zero_grad", "before_backward", "after_backward", "before_optimizer_step", "batch_end")
PHASE_FROM = dict(zip(MARKS, PHASES, strict=True))
"""The phase each mark starts."""
# Frames the sync census looks past: torch itself, the warnings machinery and this file. By package folder, not
# by a "/torch/" substring, which also matched every site-package of a virtualenv under /opt/torch/.
NOT_THE_CALLER = (str(Path(torch.__file__).parent) + os.sep, warnings.__file__, __file__)


class StepTimeline(pl.Callback):
    def __init__(self, skip: int = 5, out: str | None = None, profile: str | None = None) -> None:
        """``profile="a,b"`` (or ``STEP_TIMELINE_PROFILE``): a ``torch.profiler`` capture of steps a … b-1 whose
        top kernels are printed and written with the timeline."""
        self.skip = skip
        self.out = out or os.environ.get("STEP_TIMELINE_OUT", "step_timeline")
        window = profile or os.environ.get("STEP_TIMELINE_PROFILE")
        self.window = tuple(int(x) for x in window.split(",")) if window else None
        self.profiler: torch.profiler.profile | None = None
        self.top_kernels: list[dict[str, Any]] = []
        self.steps: list[dict[str, tuple[float, Any]]] = []
        self.count_syncs = os.environ.get("STEP_TIMELINE_SYNCS") == "1"
        self.syncs: Counter[str] = Counter()
        self.phase = "between"
        self._show_warning = warnings.showwarning

    def _record_sync(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            self._show_warning(message, category, filename, lineno, file, line)
            return
        # The innermost two frames of code outside torch and the warnings machinery: the line that synchronised.
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(NOT_THE_CALLER)][-2:]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)) or "?"
        self.syncs[f"{self.phase} | {where}"] += 1

    def _mark(self, name: str) -> None:
        self.phase = PHASE_FROM[name]
        if self.count_syncs and torch.cuda.is_available() and name == "batch_start" and len(self.steps) == self.skip:
            warnings.filterwarnings("always", message=".*synchroniz.*")
            warnings.showwarning = self._record_sync
            torch.cuda.set_sync_debug_mode("warn")
        event = None
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        # Under gradient accumulation one optimizer step spans several batches: they fold into one step,
        # timed from its first batch's start to its last batch's end.
        if name == "batch_start" and (not self.steps or "before_optimizer_step" in self.steps[-1]):
            self.steps.append({})
        if self.steps:
            if name == "batch_end":
                self.steps[-1][name] = (time.perf_counter(), event)
            else:
                self.steps[-1].setdefault(name, (time.perf_counter(), event))

    def on_fit_start(self, trainer, pl_module) -> None:
        if os.environ.get("STEP_TIMELINE_NO_CUDNN_SDPA") == "1":  # A/B runs: PyTorch's SDPA choice without cuDNN
            torch.backends.cuda.enable_cudnn_sdp(False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.window and len(self.steps) == self.window[0]:
            self.profiler = device_profiler(torch.device("cuda"))
            self.profiler.__enter__()
        if self.window and len(self.steps) == self.window[1] and self.profiler is not None:
            self._stop_profiler(self.window[1] - self.window[0])
        self._mark("batch_start")

    def _stop_profiler(self, steps: int) -> None:
        torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.top_kernels = top_operators(self.profiler, torch.device("cuda"), top=40, steps=steps)
        self.profiler = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._mark("before_backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._mark("after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._mark("before_optimizer_step")

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self._mark("before_zero_grad")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark("batch_end")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.count_syncs and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show_warning
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        steps = [s for s in self.steps[self.skip :] if all(m in s for m in MARKS)]
        rows = []
        for step, following in zip(steps, [*steps[1:], None][: len(steps)], strict=True):
            points = [step[m] for m in MARKS] + ([following["batch_start"]] if following else [])
            row = {}
            for phase, (a, b) in zip(PHASES, zip(points, points[1:], strict=False), strict=False):
                row[f"{phase}_host_ms"] = 1e3 * (b[0] - a[0])
                if a[1] is not None:
                    row[f"{phase}_gpu_ms"] = a[1].elapsed_time(b[1])
            rows.append(row)
        keys = sorted({k for row in rows for k in row})
        mean = {k: sum(row[k] for row in rows if k in row) / max(1, sum(k in row for row in rows)) for k in keys}
        report = {"rank": trainer.global_rank, "steps": len(rows), "mean_ms": mean, "per_step": rows}
        report["top_kernels"] = self.top_kernels
        measured = max(1, len(self.steps) - self.skip)
        report["syncs_per_step"] = {k: v / measured for k, v in self.syncs.most_common()}
        if trainer.global_rank == 0 and self.count_syncs:
            for where, count in self.syncs.most_common(20):
                print(f"  host syncs {count / measured:6.2f}/step  {where}", flush=True)
        if trainer.global_rank == 0:
            for row in self.top_kernels[:30]:
                print(f"  {row['ms']:8.2f} ms/step {row['calls']:7.1f}x  {row['name'][:120]}")
        path = Path(f"{self.out}.rank{trainer.global_rank}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        line = "  ".join(
            f"{p} {mean.get(f'{p}_host_ms', 0):.1f}/{mean.get(f'{p}_gpu_ms', float('nan')):.1f}" for p in PHASES
        )
        print(f"step timeline rank {trainer.global_rank} (host/GPU ms, mean of {len(rows)} steps): {line}", flush=True)
