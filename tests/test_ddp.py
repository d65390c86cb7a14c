"""Under DDP (2 CPU processes, gloo) every rank ends with bit-identical adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.parametrize("method", ["sorsa", "pissa"])
def test_ddp_ranks_hold_identical_adapters(method, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), method], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["after_init"] == ranks[1]["after_init"]
    assert ranks[0]["after_fit"] == ranks[1]["after_fit"]
    assert ranks[0]["after_fit"] != ranks[0]["after_init"]  # training did move the adapters
    # The decompositions were shared: each rank did its half of the 4 matrices (2 layers × q_proj, down_proj).
    assert [r["decomposed"] for r in ranks] == [2, 2] and ranks[0]["count"] == 4
    # Factors were broadcast, and checksums all-gathered after init and after training, under the guard.
    assert ranks[0]["collectives"]["broadcast"] >= 2 and ranks[0]["collectives"]["all_gather"] >= 2
