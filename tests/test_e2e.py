"""End-to-end: the flagship recipe through `lightning run` on the embedded SmolLM2 and real GSM8K files.

Marked ``e2e``: slow (minutes on 2 CPU cores), run once in CI as part of the normal test command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def lightning_command() -> list[str]:
    exe = shutil.which("lightning", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `lightning` console script is not installed (pip install -e .)"
    return [exe]


def test_gsm8k_sorsa_recipe_end_to_end(tmp_path):
    # fmt: off
    args = [
        *lightning_command(), "run", "--accelerator", "cpu", "--devices", "1", "recipes/gsm8k_sorsa.py",
        "--data.data_dir", str(DATA_DIR / "gsm8k"),
        "--data.max_length", "256",
        "--data.max_train_examples", "2",  # a tiny batch the model overfits: the loss must fall
        "--data.batch_size", "2",
        "--data.max_eval_examples", "8",
        "--data.eval_batch_size", "8",
        "--data.cache_dir", str(tmp_path / "hf_cache"),
        "--model.learning_rate", "3e-4",
        "--model.warmup_ratio", "0",
        "--model.scheduler", "constant",
        "--model.max_new_tokens", "48",
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--export.merged_dir", str(tmp_path / "merged"),
    ]
    # fmt: on
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    (log_dir,) = (tmp_path / "runs" / "gsm8k_sorsa").glob("version_*")
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == ["last.ckpt"]  # one file per save
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["val"]["accuracy"]["n"] == 8
    assert summary["paths"]["exports"] == {"merged model": str((tmp_path / "merged").resolve())}
    assert "run summary (fit)" in result.stdout
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert "val/accuracy" in events.Tags()["scalars"]
    assert "spectral/sv_drift_max" in events.Tags()["scalars"]
    assert "spectral/drift_heatmap" in events.Tags()["images"]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 504, 3458, 314]])
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()


def test_bad_yaml_key_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, "recipes/gsm8k_sorsa.py", "fit", "--trainer.max_stepz", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "max_stepz" in result.stderr


def test_missing_model_path_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "recipes/gsm8k_sorsa.py", "fit", "--model.model", str(tmp_path / "no_such_model")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert f"model path does not exist: {tmp_path / 'no_such_model'}" in result.stderr


def test_a_failing_multi_process_run_ends_with_the_workers_error_not_torchruns_report():
    # Two CPU processes through torchrun (gloo): each worker fails before loading the model; the launcher adds
    # no ChildFailedError report after the workers' own one-line errors.
    # fmt: off
    result = subprocess.run(
        [*lightning_command(), "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
         "recipes/gsm8k_sorsa.py", "--model.adapter.method", "doesnotexist"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # fmt: on
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[-1] == (
        "error: invalid AdapterConfig: unknown adapter 'doesnotexist'; choose one of: corda, dora, eva, loftq, "
        "lora, loraga, milora, olora, osora, pissa, sorsa, vera"
    ), result.stdout[-3000:]
    assert "ChildFailedError" not in result.stdout and "Traceback" not in result.stdout
