"""``bench/step_timeline.py``'s bookkeeping on the CPU (host clock only): steps, accumulation, no steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_timeline import PHASES, StepTimeline  # noqa: E402


def _micro_batch(timeline: StepTimeline, optimizer_step: bool) -> None:
    timeline.on_train_batch_start(None, None, None, 0)
    if optimizer_step:  # Lightning zeroes the gradients only in a step that is taken
        timeline.on_before_zero_grad(None, None, None)
    timeline.on_before_backward(None, None, None)
    timeline.on_after_backward(None, None)
    if optimizer_step:
        timeline.on_before_optimizer_step(None, None, None)
    timeline.on_train_batch_end(None, None, None, None, 0)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_one_row_per_optimizer_step(tmp_path: Path, accumulate: int) -> None:
    timeline = StepTimeline(skip=1, out=str(tmp_path / "tl"))
    for _ in range(4):
        for micro in range(accumulate):
            _micro_batch(timeline, optimizer_step=micro == accumulate - 1)
    timeline.on_train_end(SimpleNamespace(global_rank=0), None)
    report = json.loads((tmp_path / "tl.rank0.json").read_text())
    assert report["steps"] == 3  # 4 optimizer steps, the first skipped
    last = report["per_step"][-1]
    assert set(last) == {f"{p}_host_ms" for p in PHASES if p != "between"}  # the last step has no successor
    assert all(f"{p}_host_ms" in report["per_step"][0] for p in PHASES)


def test_no_complete_step_writes_an_empty_report(tmp_path: Path) -> None:
    timeline = StepTimeline(skip=5, out=str(tmp_path / "tl"))
    _micro_batch(timeline, optimizer_step=True)
    timeline.on_train_end(SimpleNamespace(global_rank=0), None)
    assert json.loads((tmp_path / "tl.rank0.json").read_text())["steps"] == 0
