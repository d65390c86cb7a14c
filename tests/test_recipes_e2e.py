"""Every recipe runs: two training steps of the real SmolLM2 in float32 on the CPU, on the offline data in
``../shared/data``, through ``lightning run`` (one process), with its documented offline data arguments.

Kept small so that all of them fit in a few minutes on two CPU cores: sequences of 128 tokens, batches of 2,
rank 4 on ``q_proj``/``v_proj`` (the SVD init of 60 matrices instead of 210), two evaluation questions per
set with 8 new tokens. The model is the embedded GGUF re-saved as safetensors once per session (the
GGUF's dequantisation costs ~12 s per load; tests/test_e2e.py runs the GGUF path itself).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from _recipe_fixtures import RECIPES, REPO, last_line, run_lightning, save_smollm2
from conftest import DATA_DIR

pytestmark = pytest.mark.e2e

COMMONSENSE_TRAIN = "[boolq/train.json,ARC-Challenge/train.json,ARC-Easy/train.json,openbookqa/train.json]"
COMMONSENSE_TASKS = "[boolq,piqa,social_i_qa,winogrande,ARC-Challenge,ARC-Easy,openbookqa]"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return save_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def metamathqa_standin(tmp_path_factory) -> Path:
    """A MetaMathQA-format file from GSM8K train, written by the documented recipes/tools script."""
    spec = importlib.util.spec_from_file_location("gsm8k_as_metamathqa", REPO / "recipes/tools/gsm8k_as_metamathqa.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = tmp_path_factory.mktemp("metamathqa")
    tool.main([str(DATA_DIR / "gsm8k" / "train.jsonl"), str(folder / "MetaMathQA-395K.json")])
    return folder


def data_args(recipe: str, metamathqa: Path) -> tuple[list[str], int]:
    """The recipe's offline data arguments (as documented in its YAML and the README) and how many
    evaluation questions they give at two per evaluation set."""
    if recipe.startswith("gsm8k_"):
        return ["--data.data_dir", str(DATA_DIR / "gsm8k")], 2
    if recipe == "metamath_sorsa":
        return [
            "--data.data_dir", str(metamathqa),
            "--data.gsm8k_dir", str(DATA_DIR / "gsm8k"),
            "--data.math_dir", str(DATA_DIR / "math500"),
        ], 4  # fmt: skip
    if recipe == "commonsense_osora":
        return [
            "--data.data_dir", str(DATA_DIR / "commonsense"),
            "--data.train_files", COMMONSENSE_TRAIN,
            "--data.tasks", COMMONSENSE_TASKS,
        ], 14  # fmt: skip
    raise AssertionError(f"no offline data arguments for the new recipe {recipe!r}: add them here and to the README")


def test_every_recipe_is_covered():
    assert RECIPES == [
        "commonsense_osora",
        "gsm8k_corda",
        "gsm8k_dora",
        "gsm8k_eva",
        "gsm8k_lora",
        "gsm8k_loraga",
        "gsm8k_milora",
        "gsm8k_olora",
        "gsm8k_osora",
        "gsm8k_pissa",
        "gsm8k_sorsa",
        "gsm8k_vera",
        "metamath_sorsa",
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_steps_offline_on_the_cpu(recipe, smollm2_dir, metamathqa_standin, tmp_path):
    data, questions = data_args(recipe, metamathqa_standin)
    args = [
        "run", "--accelerator", "cpu", "--devices", "1", f"recipes/{recipe}.py",
        *data,
        "--model.model", str(smollm2_dir),
        "--model.adapter.rank", "4",
        "--model.adapter.target_modules", "[q_proj,v_proj]",
        "--model.max_new_tokens", "8",
        "--data.max_length", "128",
        "--data.batch_size", "2",
        "--data.max_train_examples", "8",
        "--data.eval_batch_size", "8",
        "--data.max_eval_examples", "2",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    done, seconds = run_lightning(args, timeout=230)
    assert done.returncode == 0, done.stdout[-5000:]
    print(f"{recipe}: {seconds:.1f} s")

    (run_dir,) = (tmp_path / "runs" / recipe).glob("version_*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert summary["svd_init_seconds"] is not None
    accuracy = summary["eval"]["val"]["accuracy"]
    counted = sum(t["n"] for t in accuracy["tasks"].values()) if "tasks" in accuracy else accuracy["n"]
    assert counted == questions
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "run summary (fit)" in done.stdout
    assert last_line(done).strip().endswith(f"--export.peft_dir {run_dir}/peft")  # the summary ends the output
    for noise in ("LeafSpec", "litlogger", "Total FLOPs", "is_gradient_checkpointing"):
        assert noise not in done.stdout, noise
