"""Tables, loss curves and a JSON summary of a ``gsm8k_methods.py`` study.

Reads ``<study>/results.jsonl`` and ``<study>/grid.jsonl`` (plus any not yet collected shard files, merged the
way ``collect.py`` merges them) and the TensorBoard runs ``<study>/runs/<method>/seed<k>``, and writes:

- a markdown page: per method the number of seeds, trainable parameters, learning rate, GSM8K test loss,
  GSM8K accuracy and MATH-500 accuracy as seed mean ± 95% t-interval (over seeds), the pooled binomial
  (Wilson) 95% interval of the accuracies, and the mean training time; ours − PEFT differences paired by
  seed, with an exact McNemar test on the per-question answers; the learning-rate grid;
- ``loss_curves.png``: seed-averaged training loss (smoothed) and held-out loss vs step, all methods;
- a JSON summary with the same numbers.

    python recipes/studies/report.py runs/study
    python recipes/studies/report.py runs/study --table docs/results/gsm8k_methods.md \\
        --figure docs/images/loss_curves.png --summary docs/results/gsm8k_methods_summary.json

Needs matplotlib and tensorboard (for the figure); the tables need the standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ``collect`` sits next to this script (the script's folder is sys.path[0] when it is run as a script).
from collect import KEYS, QUANTIZED, best_learning_rates, load_records, merge_records, read_jsonl

LABELS = {
    "base": "untrained",
    "lora": "ours LoRA",
    "pissa": "ours PiSSA",
    "olora": "ours OLoRA",
    "sorsa": "ours SORSA",
    "osora": "ours OSoRA",
    "peft-lora": "PEFT LoRA",
    "peft-pissa": "PEFT PiSSA",
    "peft-olora": "PEFT OLoRA",
    "dora": "ours DoRA",
    "peft-dora": "PEFT DoRA",
    "vera": "ours VeRA",
    "peft-vera": "PEFT VeRA",
    "milora": "ours MiLoRA",
    "peft-mica": "PEFT MiCA",
    "corda": "ours CorDA (IPM)",
    "peft-corda": "PEFT CorDA (IPM)",
    "eva": "ours EVA",
    "peft-eva": "PEFT EVA",
    "loraga": "ours LoRA-GA",
    "peft-loraga": "PEFT LoRA-GA",
    "qlora": "ours QLoRA (NF4)",
    "qpissa": "ours QPiSSA (NF4)",
    "qsorsa": "ours QSORSA (NF4)",
    "qolora": "ours QOLoRA (NF4)",
    "qosora": "ours QOSoRA (NF4)",
    "loftq": "ours LoftQ (NF4)",
}
ORDER = list(LABELS)
# One colour per method family; ours solid, PEFT dashed, 4-bit dotted, so that pairs are easy to compare in the figure.
COLOURS = {
    "lora": "C0", "pissa": "C1", "olora": "C2", "sorsa": "C3", "osora": "C4", "base": "C7", "dora": "C5",
    "vera": "C6", "milora": "C8", "mica": "C8", "corda": "C9", "eva": "tab:olive", "loraga": "tab:cyan", "loftq": "k",
}  # fmt: skip

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (beyond that a series in 1/df is exact
# to 1e-4); a table keeps this script free of scipy.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (the 95% two-sided multiplier)."""
    if df < 1:
        raise ValueError(f"need at least one degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, n = Z975, float(df)  # Cornish–Fisher expansion of t around the normal quantile
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
    )


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean and half-width of the 95% t-interval over ``values`` (``None`` with fewer than two values)."""
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "ci95": None, "values": []}
    half = None
    if len(values) > 1:
        half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"n": len(values), "mean": statistics.fmean(values), "ci95": half, "values": values}


def wilson(correct: int, total: int, z: float = Z975) -> dict[str, Any]:
    """Wilson score 95% interval of a binomial proportion (sensible at small p, unlike the normal one)."""
    if total == 0:
        return {"correct": 0, "total": 0, "low": None, "high": None}
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return {"correct": correct, "total": total, "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def pooled_accuracy(records: list[dict], accuracy_key: str, count_key: str) -> dict[str, Any]:
    """All seeds' answers pooled into one binomial. It treats every (seed, question) as independent, which
    ignores that seeds share the questions, so it is narrower than the over-seeds interval; both are given."""
    correct = total = 0
    for record in records:
        if record.get(accuracy_key) is None or not record.get(count_key):
            continue
        n = int(record[count_key])
        correct += round(float(record[accuracy_key]) * n)  # accuracies are stored as float32 fractions
        total += n
    return wilson(correct, total)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar test of two classifiers scored on the same questions.

    Only the discordant questions count (one right, the other wrong); with no difference between the two,
    each is a fair coin, so this is a sign test: the probability of a split at least as uneven as
    ``only_first`` vs ``only_second``. 1.0 when there is no discordant question.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be non-negative, got {only_first} and {only_second}")
    discordant = only_first + only_second
    smaller = min(only_first, only_second)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2**discordant  # exact: int / int
    return min(1.0, 2 * tail)


def discordant_answers(ours: list[dict], theirs: list[dict], verdict_key: str) -> dict[str, Any] | None:
    """Per-question comparison of paired runs (``ours[i]`` with ``theirs[i]``, same seed) on the verdict
    strings stored under ``verdict_key`` ("1" right, "0" wrong, in dataset order), over the questions both
    runs answered. Pairs of every seed are pooled as independent questions. ``None`` without verdicts."""
    ours_only = theirs_only = questions = 0
    for first, second in zip(ours, theirs, strict=True):
        a, b = first.get(verdict_key), second.get(verdict_key)
        if not a or not b:
            continue
        common = min(len(a), len(b))
        answers = list(zip(a[:common], b[:common], strict=True))
        ours_only += answers.count(("1", "0"))
        theirs_only += answers.count(("0", "1"))
        questions += common
    if not questions:
        return None
    return {
        "ours_only": ours_only,
        "peft_only": theirs_only,
        "questions": questions,
        "p": mcnemar_exact(ours_only, theirs_only),
    }


# ----- summary -----------------------------------------------------------------------------------------------
def on_common_questions(results: list[dict]) -> list[dict]:
    """Rescore GSM8K accuracy on the questions every run was scored on (the shortest prefix of the test set).

    Runs record ``gsm8k_correct`` (per-question verdicts in dataset order) since session 3; older runs were
    scored on the first 400 questions only. Accuracy over a longer prefix moves to ``accuracy_all`` /
    ``eval_questions_all`` and ``accuracy`` becomes the prefix's, so seeds and methods compare on one set.
    """
    counts = [r["eval_questions"] for r in results if r.get("eval_questions")]
    if not counts:
        return results
    common = min(counts)
    rescored = []
    for record in results:
        verdicts = record.get("gsm8k_correct")
        if verdicts and record["eval_questions"] > common:
            record = record | {
                "accuracy_all": record["accuracy"],
                "eval_questions_all": record["eval_questions"],
                "accuracy": verdicts[:common].count("1") / common,
                "eval_questions": common,
            }
        rescored.append(record)
    return rescored


def summarise(results: list[dict], grid: list[dict]) -> dict[str, Any]:
    """Per-method statistics, ours − PEFT paired differences and the grid's best learning rates."""
    results = on_common_questions(results)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for record in results:
        by_method[record["method"]].append(record)
    methods = sorted(by_method, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    summary: dict[str, Any] = {"methods": {}, "ours_vs_peft": {}, "grid": {}}
    for method in methods:
        records = sorted(by_method[method], key=lambda r: r["seed"])
        entry: dict[str, Any] = {
            "label": LABELS.get(method, method),
            "seeds": [r["seed"] for r in records],
            "trainable_parameters": records[0].get("trainable_parameters", 0),
            "lr": sorted({r["lr"] for r in records if r.get("lr") is not None}),
            "test_loss": mean_ci([r.get("test_loss") for r in records]),
            "accuracy": mean_ci([r.get("accuracy") for r in records]),
            "accuracy_pooled": pooled_accuracy(records, "accuracy", "eval_questions"),
            "eval_questions": sorted({r.get("eval_questions") for r in records if r.get("eval_questions")}),
            "accuracy_all_questions": {
                r["seed"]: [r["accuracy_all"], r["eval_questions_all"]] for r in records if "accuracy_all" in r
            },
            "train_seconds": mean_ci([r.get("train_seconds") for r in records]),
            "tokens_per_second": mean_ci([r.get("tokens_per_second") for r in records]),
        }
        if any(r.get("math500_accuracy") is not None for r in records):
            entry["math500_accuracy"] = mean_ci([r.get("math500_accuracy") for r in records])
            entry["math500_accuracy_pooled"] = pooled_accuracy(records, "math500_accuracy", "math500_questions")
            entry["math500_questions"] = sorted({r["math500_questions"] for r in records if r.get("math500_questions")})
            entry["math500_seeds"] = sorted(r["seed"] for r in records if r.get("math500_accuracy") is not None)
        summary["methods"][method] = entry
    for method in methods:
        if method.startswith("peft-") and method.removeprefix("peft-") in by_method:
            pair = paired_differences(by_method[method.removeprefix("peft-")], by_method[method])
            summary["ours_vs_peft"][method.removeprefix("peft-")] = pair
        if method in QUANTIZED and QUANTIZED[method] in by_method:
            summary.setdefault("nf4_vs_full", {})[method] = paired_differences(
                by_method[method], by_method[QUANTIZED[method]]
            )
    if grid:
        summary["grid"] = {
            "best": {
                m: {**e, "losses": {f"{lr:g}": loss for lr, loss in e["losses"].items()}}
                for m, e in best_learning_rates(grid).items()
            },
            "rows": len(grid),
            "steps": sorted({r.get("steps") for r in grid if r.get("lr") is not None}),
            "heldout_examples": sorted({r.get("heldout_examples") for r in grid if r.get("heldout_examples")}),
        }
    return summary


def paired_differences(first: list[dict], second: list[dict]) -> dict[str, Any]:
    """``first − second`` over the seeds both have (same seed = same data order): loss and accuracy differences
    (mean ± 95% t-interval) and, from the per-question verdicts, the discordant answers with McNemar's p."""
    one = {r["seed"]: r for r in first}
    other = {r["seed"]: r for r in second}
    seeds = sorted(one.keys() & other.keys())
    pair: dict[str, Any] = {"seeds": seeds}
    for key in ("test_loss", "accuracy", "math500_accuracy"):
        diffs = [
            one[s][key] - other[s][key] for s in seeds if one[s].get(key) is not None and other[s].get(key) is not None
        ]
        if diffs:
            pair[key] = mean_ci(diffs)
    for verdict_key in ("gsm8k_correct", "math500_correct"):
        per_question = discordant_answers([one[s] for s in seeds], [other[s] for s in seeds], verdict_key)
        if per_question is not None:
            pair[verdict_key.replace("_correct", "_mcnemar")] = per_question
    return pair


# ----- markdown ----------------------------------------------------------------------------------------------
def _fmt(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 4, unit: str = "") -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95'] * scale:.{digits}f}"
    return text + unit


def _fmt_interval(pooled: dict[str, Any] | None) -> str:
    if not pooled or not pooled.get("total"):
        return "–"
    return f"{100 * pooled['low']:.1f}–{100 * pooled['high']:.1f} % ({pooled['correct']}/{pooled['total']})"


def _fmt_discordant(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    return f"{stat['ours_only']} / {stat['peft_only']} (p {stat['p']:.2f})"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _pairs_section(
    title: str, pairs: dict[str, dict], other_of: Callable[[str], str], sides: str, math500: bool
) -> list[str]:
    """A markdown section of paired differences ``method − other_of(method)`` (``paired_differences`` entries)."""
    rows = [
        [
            f"{LABELS.get(m, m)} − {LABELS.get(other_of(m), other_of(m))}",
            str(len(p["seeds"])),
            _fmt(p.get("test_loss")),
            _fmt(p.get("accuracy"), 100, 2, " pt"),
            *([_fmt(p.get("math500_accuracy"), 100, 2, " pt")] if math500 else []),
            _fmt_discordant(p.get("gsm8k_mcnemar")),
            *([_fmt_discordant(p.get("math500_mcnemar"))] if math500 else []),
        ]
        for m, p in pairs.items()
    ]
    header = ["pair", "seeds", "Δ test loss", "Δ GSM8K acc.", *(["Δ MATH-500 acc."] if math500 else [])]
    header += [f"GSM8K {sides} (McNemar p)", *([f"MATH-500 {sides} (McNemar p)"] if math500 else [])]
    return ["", f"## {title}", "", *_markdown_table(header, rows)]


def markdown(summary: dict[str, Any], grid: list[dict], figure: Path | None, table_path: Path) -> str:
    """The report page: results table, ours − PEFT differences, learning-rate grid, figure."""
    methods = summary["methods"]
    has_math = any("math500_accuracy" in e for e in methods.values())
    header = ["method", "seeds", "trainable params", "LR", "GSM8K test loss", "GSM8K acc.", "GSM8K acc. pooled"]
    header += ["MATH-500 acc.", "MATH-500 pooled"] if has_math else []
    header += ["train s"]
    rows = []
    for entry in methods.values():
        row = [
            entry["label"],
            str(len(entry["seeds"])),
            f"{entry['trainable_parameters']:,}",
            ", ".join(f"{lr:g}" for lr in entry["lr"]) or "–",
            _fmt(entry["test_loss"]),
            _fmt(entry["accuracy"], 100, 2, " %"),
            _fmt_interval(entry["accuracy_pooled"]),
        ]
        if has_math:
            math_accuracy = _fmt(entry.get("math500_accuracy"), 100, 2, " %")
            math_seeds = entry.get("math500_seeds", [])
            if 0 < len(math_seeds) < len(entry["seeds"]):  # a MATH-500 mean over fewer seeds must say so
                math_accuracy += f" (seed{'s' * (len(math_seeds) > 1)} {', '.join(map(str, math_seeds))})"
            row += [math_accuracy, _fmt_interval(entry.get("math500_accuracy_pooled"))]
        row.append(_fmt(entry["train_seconds"], digits=1))
        rows.append(row)
    questions = sorted({n for e in methods.values() for n in e["eval_questions"]})
    lines = ["# GSM8K methods study: results"]
    if rows:
        lines += [
            "",
            "Mean ± half-width of the 95% t-interval over seeds (no ± with one seed). *Pooled*: Wilson 95%",
            "interval of all seeds' answers taken as one binomial (correct/total); it ignores that seeds share",
            f"the questions. GSM8K questions per seed: {', '.join(map(str, questions)) or '–'}.",
            "",
            *_markdown_table(header, rows),
        ]
    pairs = {k: v for k, v in summary["ours_vs_peft"].items() if len(v) > 1}
    if pairs:
        lines += _pairs_section(
            "Ours − PEFT, paired by seed", pairs, lambda m: "peft-" + m, "ours only / PEFT only", True
        )
        lines += [
            "",
            "*Ours only / PEFT only*: questions that one side of a same-seed pair answered right and the other",
            "wrong, summed over seeds; *p*: two-sided exact McNemar test on them (seeds pooled).",
        ]
    quantized = {k: v for k, v in summary.get("nf4_vs_full", {}).items() if len(v) > 1}
    if quantized:
        title = "4-bit NF4 base − full precision, paired by seed"
        lines += _pairs_section(title, quantized, QUANTIZED.get, "4-bit only / full only", False)
    if grid:
        info = summary["grid"]
        lrs = sorted({float(r["lr"]) for r in grid if r.get("lr") is not None})
        best = best_learning_rates(grid)
        base = [r["heldout_loss"] for r in grid if r["method"] == "base"]
        lines += [
            "",
            "## Learning-rate grid",
            "",
            f"Held-out teacher-forced loss after {', '.join(map(str, info['steps']))} steps on "
            f"{', '.join(map(str, info['heldout_examples']))} held-out GSM8K training problems (seed mean); "
            "**bold**: the best learning rate per method."
            + (f" Untrained model: {statistics.fmean(base):.4f}." if base else ""),
            "",
        ]
        grid_rows = []
        for method in sorted(best, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
            cells = []
            for lr in lrs:
                loss = best[method]["losses"].get(lr)
                cell = "–" if loss is None else f"{loss:.4f}"
                cells.append(f"**{cell}**" if lr == best[method]["lr"] else cell)
            grid_rows.append([LABELS.get(method, method), *cells])
        lines += _markdown_table(["method", *(f"{lr:g}" for lr in lrs)], grid_rows)
    if figure is not None:
        link = Path(os.path.relpath(figure.resolve(), table_path.resolve().parent))  # relative: works in the docs
        lines += ["", "## Loss curves", "", f"![Training and held-out loss]({link.as_posix()})"]
    return "\n".join(lines) + "\n"


# ----- figure ------------------------------------------------------------------------------------------------
def newest_events_file(run_dir: Path) -> Path | None:
    """The most recent event file of a run folder: a rerun of the same (method, seed) writes a new file next to
    the old one, and reading both would mix two runs' points."""
    files = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def read_scalars(path: Path, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of one event file (a later value for the same step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    present = events.Tags()["scalars"]
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags if tag in present}


def seed_mean(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Average curves over seeds at the steps all of them have (else at every step, over the seeds that have it)."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = set.intersection(*(set(c) for c in curves)) or set.union(*(set(c) for c in curves))
    steps_sorted = sorted(steps)
    return steps_sorted, [statistics.fmean(c[s] for c in curves if s in c) for s in steps_sorted]


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, TensorBoard's ``smoothing`` (0: raw)."""
    smoothed, last = [], None
    for value in values:
        last = value if last is None else weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def loss_curves(runs_dir: Path, results: list[dict], smoothing: float) -> dict[str, dict[str, Any]]:
    """Seed-averaged ``train/loss`` and ``heldout/loss`` per method from the TensorBoard runs.

    Only seeds with a record in ``results`` are used when the method has any (a run that crashed before its
    record was written is left out); the records' ``heldout_curve`` and ``train_curve`` stand in when a run
    folder is missing. ``train_seeds`` are the seeds behind the training curve: older records have no
    ``train_curve``, so it may average fewer seeds than the held-out curve (the figure says how many).
    """
    seeds_of: dict[str, set[int]] = defaultdict(set)
    for record in results:
        seeds_of[record["method"]].add(record["seed"])
    method_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    curves: dict[str, dict[str, Any]] = {}
    for method_dir in method_dirs:
        method = method_dir.name
        train, heldout, seeds = [], [], []
        for run_dir in sorted(method_dir.glob("seed*")):
            seed = int(run_dir.name.removeprefix("seed"))
            if seeds_of.get(method) and seed not in seeds_of[method]:
                continue
            events = newest_events_file(run_dir)
            if events is None:
                continue
            scalars = read_scalars(events, ("train/loss", "heldout/loss"))
            train.append(scalars.get("train/loss", {}))
            heldout.append(scalars.get("heldout/loss", {}))
            seeds.append(seed)
        if seeds:
            curves[method] = {
                "seeds": seeds,
                "train_seeds": [seed for seed, scalars in zip(seeds, train, strict=True) if scalars],
                "train": seed_mean(train),
                "heldout": seed_mean(heldout),
            }
    for method in seeds_of:
        if method in curves or method == "base":
            continue
        stored = {
            r["seed"]: {int(s): float(v) for s, v in r["heldout_curve"]}
            for r in results
            if r["method"] == method and r.get("heldout_curve")
        }  # only the seeds that have a curve count in the legend's n
        trained = {
            r["seed"]: {int(s): float(v) for s, v in r["train_curve"]}
            for r in results
            if r["method"] == method and r.get("train_curve") and r["seed"] in stored
        }  # records carry a training curve since session 4
        if stored:
            curves[method] = {
                "seeds": sorted(stored),
                "train_seeds": sorted(trained),
                "train": seed_mean([trained[seed] for seed in sorted(trained)]),
                "heldout": seed_mean(list(stored.values())),
            }
    for entry in curves.values():
        steps, values = entry["train"]
        entry["train_smoothed"] = (steps, ema(values, smoothing))
    return curves


def plot_curves(curves: dict[str, dict[str, Any]], path: Path, smoothing: float) -> Path:
    """Two panels: smoothed training loss and held-out loss vs optimizer step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_train = any(entry["train"][0] for entry in curves.values())
    if has_train:
        fig, (train_ax, heldout_ax) = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    else:  # records only (the TensorBoard runs stayed elsewhere): no empty training panel
        fig, heldout_ax = plt.subplots(1, 1, figsize=(7, 4.6))
        train_ax = None
    for method in sorted(curves, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        entry = curves[method]
        family = QUANTIZED.get(method, method.removeprefix("peft-"))
        style = {
            "color": COLOURS.get(family),
            "linestyle": "--" if method.startswith("peft-") else ":" if method in QUANTIZED else "-",
            "label": f"{LABELS.get(method, method)} (n={len(entry['seeds'])})",
        }
        steps, raw = entry["train"]
        if steps:
            train_ax.plot(steps, raw, color=style["color"], alpha=0.2, linewidth=0.8)
            train_label = f"{LABELS.get(method, method)} (n={len(entry['train_seeds'])})"
            train_ax.plot(*entry["train_smoothed"], **(style | {"label": train_label}))
        if entry["heldout"][0]:
            heldout_ax.plot(*entry["heldout"], marker="o", markersize=3, **style)
    if train_ax is not None:
        train_ax.set_title(f"training loss (seed mean, EMA smoothing {smoothing:g})")
    heldout_ax.set_title("held-out loss (seed mean, fixed GSM8K test subset)")
    for ax in (a for a in (train_ax, heldout_ax) if a is not None):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("token NLL")
        ax.grid(alpha=0.3)
    handles, labels = heldout_ax.get_legend_handles_labels()
    if not handles and train_ax is not None:
        handles, labels = train_ax.get_legend_handles_labels()
    if len(handles) > 10:  # many methods: one legend beside the panels instead of over the curves
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    elif handles:
        heldout_ax.legend(handles, labels, fontsize=8)
    if train_ax is not None and any(e["train_seeds"] != e["seeds"] for e in curves.values() if e["train"][0]):
        train_ax.legend(fontsize=8)  # its seed counts differ from the held-out panel's
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----- command line ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path, help="the --out folder of gsm8k_methods.py")
    parser.add_argument("--results", type=Path, default=None, help="a results.jsonl instead of the study's")
    parser.add_argument("--grid", type=Path, default=None, help="a grid.jsonl instead of the study's")
    parser.add_argument("--runs", type=Path, default=None, help="TensorBoard runs folder (default: <study>/runs)")
    parser.add_argument("--table", type=Path, default=Path("docs/results/gsm8k_methods.md"))
    parser.add_argument("--figure", type=Path, default=Path("docs/images/loss_curves.png"))
    parser.add_argument("--summary", type=Path, default=Path("docs/results/gsm8k_methods_summary.json"))
    parser.add_argument("--smoothing", type=float, default=0.6, help="EMA weight for the training loss")
    parser.add_argument("--no-figure", action="store_true", help="tables and summary only (no matplotlib)")
    args = parser.parse_args()
    # An explicit file is deduplicated like collect.py does, in case it was concatenated by hand.
    results = merge_records(read_jsonl(args.results), KEYS["results"]) if args.results else None
    grid = merge_records(read_jsonl(args.grid), KEYS["grid"]) if args.grid else None
    results = results if results is not None else load_records(args.study_dir, "results")
    grid = grid if grid is not None else load_records(args.study_dir, "grid")
    if not results and not grid:
        raise SystemExit(f"no results.jsonl / grid.jsonl records under {args.study_dir}")
    summary = summarise(results, grid)
    figure = None
    if not args.no_figure and results:
        curves = loss_curves(args.runs or args.study_dir / "runs", results, args.smoothing)
        summary["curves"] = {
            method: {
                "seeds": e["seeds"],
                "train": list(map(list, e["train"])),
                "heldout": list(map(list, e["heldout"])),
            }
            for method, e in curves.items()
        }
        if curves:
            figure = plot_curves(curves, args.figure, args.smoothing)
            print(f"wrote {figure}")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(markdown(summary, grid, figure, args.table))
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.table} and {args.summary}")
    print(args.table.read_text())


if __name__ == "__main__":
    main()
