"""Kill anywhere, resume exactly: 20 SIGKILLs at random points, 4 per method, each run resumed from last.ckpt.

Each method's run is killed 4 times in a row (each resumed run is the next one killed), at random steps and
phases — in the forward pass, between backward and optimizer step, half-way through a checkpoint write,
between the write and its commit, during validation — and then finishes. It must end with exactly the
uninterrupted run's adapters and optimizer state (bit for bit: same machine, one thread), having trained
on exactly its batches, and no kill may cost the last good checkpoint. ``docs/reliability.md`` has the table.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from faults import METHODS, PHASES, SAVE_EVERY, STEPS, VALIDATE_EVERY, final_state, train

SCRIPT = Path(__file__).parent / "faults.py"
# The CI sweep; a longer one: LIT_SVD_FAULT_KILLS=8 LIT_SVD_FAULT_SEED=7 LIT_SVD_FAULT_REPORT=out.json pytest …
KILLS_PER_METHOD = int(os.environ.get("LIT_SVD_FAULT_KILLS", 4))
SEED = int(os.environ.get("LIT_SVD_FAULT_SEED", 2026))
# Steps at which a checkpoint is written (every SAVE_EVERY steps, after each validation, at the end) and
# after which a validation runs: where the checkpoint and validation phases can be hit.
SAVES = sorted({*range(SAVE_EVERY, STEPS + 1, SAVE_EVERY), *range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY)})
VALIDATIONS = list(range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY))


def kill_plan(seed: int = SEED) -> dict[str, list[tuple[str, int]]]:
    """4 kills per method at increasing random steps, each in a phase that can happen at that step (phases not
    yet used by the method first)."""
    rng = random.Random(seed)
    plan = {}
    for method in METHODS:
        kills: list[tuple[str, int]] = []
        for step in sorted(rng.sample(range(2, STEPS), KILLS_PER_METHOD)):
            possible = ["forward", "optimizer"]
            possible += ["checkpoint-write", "checkpoint-commit"] if step in SAVES else []
            possible += ["validation"] if step in VALIDATIONS else []
            fresh = [p for p in possible if p not in {phase for phase, _ in kills}]
            kills.append((rng.choice(fresh or possible), step))
        plan[method] = kills
    return plan


def _checkpoint_loads(path: Path) -> bool:
    try:
        return "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load is a lost checkpoint
        return False


def run_chain(root: Path, method: str, kills: list[tuple[str, int]], model: str = "tiny") -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outcome = {"method": method, "kills": [], "lost_checkpoints": 0}
    for phase, step in kills:
        before = root / "ckpt" / "last.ckpt"
        had = before.exists()
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(root), "--method", method, "--model", model, "--kill", f"{phase}:{step}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        killed = result.returncode == -9
        loads = _checkpoint_loads(before) if before.exists() else None
        outcome["lost_checkpoints"] += int(had and not loads)
        outcome["kills"].append({"phase": phase, "step": step, "killed": killed, "checkpoint_loads": loads})
        if not killed:
            outcome["error"] = f"{phase}:{step} exited {result.returncode}: {result.stderr[-2000:]}"
            return outcome
    command = [sys.executable, str(SCRIPT), str(root), "--method", method, "--model", model]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        outcome["error"] = f"final run exited {result.returncode}: {result.stderr[-2000:]}"
    return outcome


def _batches(path: Path) -> list[list[int]]:
    by_step: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():  # a resumed run redoes the steps after its checkpoint
        step, *numbers = map(int, line.split())
        by_step[step] = numbers
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.timeout(900 * max(1, KILLS_PER_METHOD // 4))
def test_twenty_kills_at_random_points_resume_to_the_uninterrupted_run(tmp_path):
    plan = kill_plan()
    assert sum(len(k) for k in plan.values()) == KILLS_PER_METHOD * len(METHODS)
    assert {phase for kills in plan.values() for phase, _ in kills} == set(PHASES)  # every phase is hit
    with ThreadPoolExecutor(max_workers=len(METHODS)) as pool:
        chains = {m: pool.submit(run_chain, tmp_path / m, m, kills) for m, kills in plan.items()}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:  # the references, in this process meanwhile
            references = {}
            for method in METHODS:
                module, trainer, record = train(tmp_path / f"reference-{method}", method)
                references[method] = (final_state(module, trainer), record.numbers)
        finally:
            torch.set_num_threads(threads)
        outcomes = {m: future.result() for m, future in chains.items()}

    rows = []
    for method in METHODS:
        outcome = outcomes[method]
        assert "error" not in outcome, outcome.get("error")
        reference, reference_batches = references[method]
        resumed = torch.load(tmp_path / method / "final.pt", weights_only=True)
        assert resumed["step"] == reference["step"] == STEPS
        for key, value in reference["adapter"].items():
            torch.testing.assert_close(resumed["adapter"][key], value, rtol=0, atol=0, msg=f"{method} {key}")
        for index, state in reference["optimizer"].items():
            for name, value in state.items():
                torch.testing.assert_close(resumed["optimizer"][index][name], value, rtol=0, atol=0)
        assert _batches(tmp_path / method / "batches.txt") == reference_batches
        assert outcome["lost_checkpoints"] == 0
        assert all(k["killed"] for k in outcome["kills"])
        rows.append(outcome)
    report = os.environ.get("LIT_SVD_FAULT_REPORT")
    if report:  # docs/reliability.md's table comes from this file
        Path(report).write_text(json.dumps({"plan": plan, "outcomes": rows}, indent=1) + "\n")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_killed_twice_resumes_to_the_uninterrupted_run(tmp_path):
    # The real model (SORSA on all 7 projections of 30 layers): killed between backward and optimizer step,
    # then half-way through a checkpoint write, then finished.
    outcome = run_chain(tmp_path / "run", "sorsa", [("optimizer", 4), ("checkpoint-write", 9)], model="smollm2")
    assert "error" not in outcome, outcome.get("error")
    assert all(k["killed"] for k in outcome["kills"]) and outcome["lost_checkpoints"] == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, trainer, record = train(tmp_path / "reference", "sorsa", model="smollm2")
    finally:
        torch.set_num_threads(threads)
    reference = final_state(module, trainer)
    resumed = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    for key, value in reference["adapter"].items():
        torch.testing.assert_close(resumed["adapter"][key], value, rtol=0, atol=0, msg=key)
    assert _batches(tmp_path / "run" / "batches.txt") == record.numbers
