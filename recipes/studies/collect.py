"""Merge the per-shard outputs of ``gsm8k_methods.py`` into ``results.jsonl`` and ``grid.jsonl``.

Each ``--shard i/N`` process appends to its own ``results.shard{i}.jsonl`` / ``grid.shard{i}.jsonl`` so that
concurrent processes never write the same file. This script reads the existing merged file and every shard
file of a study folder, keeps one record per key — (method, seed) for results, (method, seed, lr) for the
grid — preferring the most recently finished one (a rerun replaces an earlier record), and rewrites the
merged files. Shard files are left in place, so collecting twice gives the same result.

    python recipes/studies/collect.py runs/study

Standard library only: it also runs where torch is not installed, and ``gsm8k_methods.py`` and
``report.py`` import its helpers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

__all__ = ["KEYS", "QUANTIZED", "best_learning_rates", "load_records", "merge_records", "read_jsonl", "write_jsonl"]

KEYS: dict[str, tuple[str, ...]] = {"results": ("method", "seed"), "grid": ("method", "seed", "lr")}
"""Record identity per output kind: one line per key survives merging."""
QUANTIZED = {"qlora": "lora", "qpissa": "pissa", "qolora": "olora", "qsorsa": "sorsa", "qosora": "osora"}
"""The study's 4-bit methods and the full-precision method each quantizes (the NF4 base holds its residual):
gsm8k_methods.py runs them with that method's learning rate, report.py pairs them with it."""


def read_jsonl(path: Path) -> list[dict]:
    """The JSON records of ``path``, one per non-empty line; a truncated last line (a killed process) is skipped."""
    records = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{number}: skipping a line that is not JSON (interrupted write?)")
    return records


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write ``records`` one JSON object per line (replacing ``path``)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one


def merge_records(records: Iterable[dict], key: tuple[str, ...]) -> list[dict]:
    """One record per ``key``: the latest ``finished_at`` wins, else the one read last.

    The result is sorted by method (in order of first appearance), then seed, then learning rate.
    """
    best: dict[tuple, dict] = {}
    first_seen: dict[str, int] = {}
    for record in records:
        first_seen.setdefault(record["method"], len(first_seen))
        identity = tuple(record.get(k) for k in key)
        previous = best.get(identity)
        # ISO timestamps compare as strings; records without one (older files) lose to ones with.
        if previous is None or record.get("finished_at", "") >= previous.get("finished_at", ""):
            best[identity] = record

    def order(record: dict) -> tuple:
        lr = record.get("lr")
        return (first_seen[record["method"]], record.get("seed", 0), -1.0 if lr is None else float(lr))

    return sorted(best.values(), key=order)


def load_records(folder: Path, kind: str) -> list[dict]:
    """The merged records of ``folder``: ``{kind}.jsonl`` plus every ``{kind}.shard*.jsonl``, deduplicated.

    Args:
        folder: the study's ``--out`` folder.
        kind: ``"results"`` or ``"grid"``.
    """
    paths = [folder / f"{kind}.jsonl", *sorted(folder.glob(f"{kind}.shard*.jsonl"))]
    records = [record for path in paths if path.is_file() for record in read_jsonl(path)]
    return merge_records(records, KEYS[kind])


def best_learning_rates(grid: Iterable[dict]) -> dict[str, dict]:
    """Per method, the learning rate with the lowest held-out loss averaged over seeds.

    A learning rate at which any seed diverged (NaN or infinite loss) is disqualified: its mean is ``inf``,
    even if other seeds trained fine, since a rate that is unstable for some seeds is not a safe choice.

    Returns:
        ``{method: {"lr", "heldout_loss" (seed mean), "seeds", "losses": {lr: mean}}}``; methods whose rows
        have no learning rate (``base``) or no finite mean are left out.
    """
    losses: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in grid:
        loss = row.get("heldout_loss")
        if row.get("lr") is None or loss is None:
            continue
        loss = float(loss)
        losses[row["method"]][float(row["lr"])].append(loss if math.isfinite(loss) else math.inf)
    best = {}
    for method, by_lr in losses.items():
        means = {lr: statistics.fmean(values) for lr, values in sorted(by_lr.items())}
        finite = {lr: mean for lr, mean in means.items() if math.isfinite(mean)}
        if not finite:
            continue
        lr = min(finite, key=finite.get)
        best[method] = {"lr": lr, "heldout_loss": means[lr], "seeds": len(by_lr[lr]), "losses": means}
    return best


def format_best(best: dict[str, dict]) -> str:
    """A small text table: method, best LR, its held-out loss, and the loss at every LR tried."""
    lines = []
    for method, entry in best.items():
        others = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in entry["losses"].items())
        lines.append(f"{method:>12}  best lr {entry['lr']:g}  (held-out loss {entry['heldout_loss']:.4f}; {others})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path, help="the --out folder of gsm8k_methods.py")
    args = parser.parse_args()
    for kind in KEYS:
        shards = sorted(args.study_dir.glob(f"{kind}.shard*.jsonl"))
        merged_path = args.study_dir / f"{kind}.jsonl"
        if not shards and not merged_path.is_file():
            continue
        records = load_records(args.study_dir, kind)
        write_jsonl(merged_path, records)
        print(f"{merged_path}: {len(records)} records (from {len(shards)} shard files)")
        if kind == "grid":
            print(format_best(best_learning_rates(records)))


if __name__ == "__main__":
    main()
