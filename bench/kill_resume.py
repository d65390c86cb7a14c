"""Kill a multi-GPU recipe run with SIGKILL, resume it from its last checkpoint, and compare with a run that
was never interrupted: the final adapters and optimizer state, tensor by tensor.

The CPU tests do this with gloo (tests/test_ddp.py, tests/test_fsdp.py, tests/test_faults.py); this script
does it on GPUs through ``lightning run`` (NCCL, cuBLAS, the recipe's own ``AdapterCheckpoint``), where
nothing guarantees bit-equality: it reports the largest differences, and the tolerance is the reader's.

Usage (on a machine with 2 GPUs):
    python bench/kill_resume.py --model /tmp/smol --data ../shared/data/gsm8k --out /tmp/kr --strategy fsdp \\
        --steps 30 --every 5 --kill-after 2 [-- extra recipe args]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

RECIPE = "recipes/gsm8k_sorsa.py"
CONFIG = Path("recipes/configs/gsm8k_sorsa.yaml")


def overlay(path: Path, every: int) -> Path:
    """The recipe's callbacks with the checkpoint written every ``every`` steps (a list is replaced whole)."""
    callbacks = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("AdapterCheckpoint"):
            callback.setdefault("init_args", {})["every_n_train_steps"] = every
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def command(args: argparse.Namespace, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        "lightning", "run", "--accelerator", args.accelerator, "--devices", "2", "--strategy", args.strategy,
        "--precision", args.precision, RECIPE,
        "--config", str(args.out / "overlay.yaml"),
        "--model.model", args.model, "--data.data_dir", args.data,
        "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
        "--export.merged_dir", "null", "--export.peft_dir", "null",
        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir / "runs"),
        *args.recipe_args, *extra,
    ]  # fmt: skip


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def written_at(checkpoint: Path | None) -> float | None:
    """When ``checkpoint`` was last completed: a file's mtime, or a sharded folder's metadata (written last)."""
    if checkpoint is None:
        return None
    marker = checkpoint / ".metadata" if checkpoint.is_dir() else checkpoint
    return marker.stat().st_mtime if marker.exists() else None


def load(checkpoint: Path) -> dict:
    if checkpoint.is_dir():  # a torch.distributed.checkpoint folder: one file per rank
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(checkpoint, Path(tmp) / "whole.pt")
            whole = torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=False)
        extra = torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=False)
        return whole | {k: v for k, v in extra.items() if k not in whole}
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out |= tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def compare(a: dict, b: dict) -> dict:
    result = {"global_step": [a.get("global_step"), b.get("global_step")]}
    # A single file keeps the optimizers under "optimizer_states"; a sharded folder under "optimizer_0", ….
    for part in ["state_dict"] + sorted(k for k in a if k.startswith("optimizer")):
        ta, tb = tensors(a.get(part)), tensors(b.get(part))
        if ta.keys() != tb.keys():
            result[part] = {"keys_differ": sorted(ta.keys() ^ tb.keys())[:10]}
            continue
        diffs = {k: (ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].numel()}
        worst = max(diffs, key=diffs.get) if diffs else None
        scale = max((ta[k].double().abs().max().item() for k in ta if ta[k].numel()), default=0.0)
        result[part] = {
            "tensors": len(ta),
            "bit_identical": sum(d == 0 for d in diffs.values()),
            "max_abs_diff": diffs.get(worst, 0.0),
            "worst": worst,
            "largest_value": scale,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N optimizer steps")
    parser.add_argument("--kill-after", type=int, default=2, help="kill after this many checkpoint writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cuda")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("recipe_args", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overlay(args.out / "overlay.yaml", args.every)
    rng = random.Random(args.seed)
    seconds: dict[str, float] = {}

    start = time.time()
    with open(args.out / "full.log", "w") as log:
        subprocess.run(command(args, args.out / "full", []), stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds["uninterrupted"] = time.time() - start

    start = time.time()
    killed_dir = args.out / "killed"
    with open(args.out / "killed.log", "w") as log:
        process = subprocess.Popen(
            command(args, killed_dir, []), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        writes, last_seen = 0, None
        while process.poll() is None and writes < args.kill_after:
            seen = written_at(newest_checkpoint(killed_dir))
            if seen is not None and seen != last_seen:
                writes, last_seen = writes + 1, seen
            time.sleep(0.2)
        if process.poll() is not None:
            raise SystemExit(f"the run ended before {args.kill_after} checkpoint writes; see {args.out / 'killed.log'}")
        delay = rng.uniform(0.0, 2.0)  # somewhere in the steps after that write
        time.sleep(delay)
        if process.poll() is not None:
            raise SystemExit(f"the run finished before the kill; use more --steps (see {args.out / 'killed.log'})")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    seconds["until_kill"] = time.time() - start
    checkpoint = newest_checkpoint(killed_dir)
    resumed_from = load(checkpoint)["global_step"]
    if resumed_from >= args.steps:
        raise SystemExit(f"the killed run had written its final checkpoint (step {resumed_from}); use more --steps")

    start = time.time()
    with open(args.out / "resumed.log", "w") as log:
        subprocess.run(
            command(args, killed_dir, ["--ckpt_path", str(checkpoint)]),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    seconds["resumed"] = time.time() - start

    report = {
        "strategy": args.strategy,
        "steps": args.steps,
        "checkpoint_every": args.every,
        "killed_after_writes": args.kill_after,
        "kill_delay_s": round(delay, 2),
        "resumed_from_step": resumed_from,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "recipe_args": args.recipe_args,
        "comparison": compare(load(newest_checkpoint(args.out / "full")), load(newest_checkpoint(killed_dir))),
    }
    (args.out / "kill_resume.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
