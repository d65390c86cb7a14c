"""``bench/recipe.py`` end to end on the CPU: its plumbing, not its timings (those need a GPU).

The script is what the performance numbers come from, so a broken layout table or result record would
only show up on the scarce GPU otherwise. ``--smoke`` runs 2 steps on 64 examples of the real GSM8K files
with the embedded SmolLM2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _data_fixtures import DATA_DIR

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _recipe_bench(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(BENCH.parent)}
    return subprocess.run(
        [sys.executable, "recipe.py", "--data-dir", str(DATA_DIR / "gsm8k"), *args],
        cwd=BENCH,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_smoke_run_measures_the_anchor_and_a_layout_and_reports_a_failing_layout_without_stopping():
    # On the CPU the CUDA-graph layout must fail (it needs CUDA); the runs after it must still happen.
    done = _recipe_bench("--smoke", "--runs", "peft-loop", "ours:lora:layergraphs", "ours:sorsa:packed")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "failed runs: ours:lora:layergraphs" in output
    failure = "ours:lora:layergraphs: failed: ValueError: cuda_graph_layers needs a CUDA device; this module is on cpu"
    assert failure in output
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    columns = lines[header].split()
    rows = {}
    for line in lines[header + 2 :]:
        cells = line.split()
        if len(cells) == len(columns):
            rows[f"{cells[0]} {cells[1]}"] = dict(zip(columns, cells, strict=True))
    anchor, ours = rows["peft-loop padded"], rows["ours:sorsa packed"]
    assert anchor["steps"] == ours["steps"] == "2"
    assert int(anchor["tokens_per_s"]) > 0 and int(ours["tokens_per_s"]) > 0
    assert float(ours["x_tokens_per_s"]) > 0  # a ratio against the anchor of the same run


def test_unknown_layout_is_named_with_the_known_ones():
    done = _recipe_bench("--smoke", "--runs", "ours:lora:fastest")
    assert done.returncode == 2
    assert "unknown run 'ours:lora:fastest'" in done.stderr and "layergraphs" in done.stderr
