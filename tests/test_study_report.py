"""The pure logic of the GSM8K study scripts: ``recipes/studies/collect.py`` and ``recipes/studies/report.py``.

Statistics (t-interval, Wilson interval, pooled accuracy, rescoring on common questions, paired differences),
shard merging and the learning-rate grid, the markdown page and the loss-curve figure, on small synthetic
records shaped like ``docs/results/gsm8k_methods_tuned.jsonl`` and ``docs/results/gsm8k_lr_grid.jsonl``.
No GPU, no model.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

# The study scripts import each other as plain modules (``from collect import ...``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "studies"))
import collect  # noqa: E402
import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----- synthetic records -------------------------------------------------------------------------------------
def result(method: str, seed: int, **fields) -> dict:
    """A ``results.jsonl`` record: 400 GSM8K questions, no MATH-500 unless given."""
    record = {"method": method, "seed": seed, "eval_questions": 400, "trainable_parameters": 1_000}
    if method != "base":
        record["lr"] = 5e-4
    return record | fields


def grid_row(method: str, seed: int, lr: float | None, loss: float, **fields) -> dict:
    """A ``grid.jsonl`` row."""
    row = {"method": method, "seed": seed, "lr": lr, "steps": 100, "heldout_loss": loss, "heldout_examples": 500}
    return row | fields


# Mean held-out loss per (method, lr): lora 1e-4 → 1.00 (seeds 0.80, 1.20), 5e-4 → 0.925, 1e-3 → 0.95;
# pissa 1e-4 → 0.97, 5e-4 → 0.99 (no 1e-3 run).
GRID = [
    grid_row("lora", 0, 1e-4, 0.80),
    grid_row("lora", 1, 1e-4, 1.20),
    grid_row("lora", 0, 5e-4, 0.90),
    grid_row("lora", 1, 5e-4, 0.95),
    grid_row("lora", 0, 1e-3, 0.94),
    grid_row("lora", 1, 1e-3, 0.96),
    grid_row("pissa", 0, 1e-4, 0.97),
    grid_row("pissa", 0, 5e-4, 0.99),
    grid_row("base", 0, None, 1.45),
]


def study_results() -> list[dict]:
    """lora seeds 0–2 and peft-lora seeds 1–3 (seeds 1 and 2 pair), an untrained base; peft-lora listed first."""
    return [
        result("peft-lora", 1, test_loss=0.82, accuracy=0.38, math500_accuracy=0.10, math500_questions=500),
        result("peft-lora", 2, test_loss=0.86, accuracy=0.36),
        result("peft-lora", 3, test_loss=0.70, accuracy=0.50),
        result("lora", 0, test_loss=0.90, accuracy=0.30, math500_accuracy=0.12, math500_questions=500),
        result("lora", 1, test_loss=0.80, accuracy=0.40, math500_accuracy=0.14, math500_questions=500),
        result("lora", 2, test_loss=0.85, accuracy=0.35, math500_accuracy=0.16, math500_questions=500),
        result("base", 0, test_loss=1.45, accuracy=0.02, trainable_parameters=0),
    ]


# ----- statistics --------------------------------------------------------------------------------------------
def test_mean_ci_t_interval():
    stat = report.mean_ci([1.0, 2.0, 3.0])
    assert stat["n"] == 3
    assert stat["mean"] == pytest.approx(2.0)
    assert stat["ci95"] == pytest.approx(4.3027 * 1.0 / math.sqrt(3))  # t_{0.975,2} · s / √n, s = 1
    assert stat["values"] == [1.0, 2.0, 3.0]


def test_mean_ci_one_value_has_no_interval():
    assert report.mean_ci([0.7]) == {"n": 1, "mean": 0.7, "ci95": None, "values": [0.7]}


def test_mean_ci_drops_missing_and_non_finite_values():
    stat = report.mean_ci([None, 1.0, float("nan"), 3.0, float("inf")])
    assert stat["values"] == [1.0, 3.0]
    assert stat["mean"] == pytest.approx(2.0)
    assert stat["ci95"] == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2))  # t_{0.975,1}, s = √2
    assert report.mean_ci([None, float("nan")]) == {"n": 0, "mean": None, "ci95": None, "values": []}
    assert report.mean_ci([])["mean"] is None


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062), (2, 4.3027), (30, 2.0423), (31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)],
)
def test_t_quantile_table_and_series(df, expected):
    """Table up to df = 30, Cornish–Fisher series beyond (reference values of t_{0.975, df})."""
    assert report.t_quantile_975(df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError, match="degree of freedom"):
        report.t_quantile_975(0)


def test_wilson_matches_closed_form():
    correct, total, z = 6, 400, 1.959964
    # (2np + z² ± z √(z² + 4np(1 − p))) / (2(n + z²)): the same interval written another way.
    p = correct / total
    root = z * math.sqrt(z * z + 4 * total * p * (1 - p))
    low = (2 * total * p + z * z - root) / (2 * (total + z * z))
    high = (2 * total * p + z * z + root) / (2 * (total + z * z))
    interval = report.wilson(correct, total)
    assert interval["correct"] == 6 and interval["total"] == 400
    assert interval["low"] == pytest.approx(low, rel=1e-9)
    assert interval["high"] == pytest.approx(high, rel=1e-9)
    assert 0.0068 < interval["low"] < 0.0069 and 0.0323 < interval["high"] < 0.0324
    assert interval["low"] < p < interval["high"]


def test_wilson_edges():
    assert report.wilson(0, 0) == {"correct": 0, "total": 0, "low": None, "high": None}
    nothing = report.wilson(0, 50)
    assert nothing["low"] == 0.0 and nothing["high"] == pytest.approx(1 - 0.9286524, abs=1e-6)
    everything = report.wilson(50, 50)
    assert everything["high"] == pytest.approx(1.0) and everything["low"] == pytest.approx(0.9286524, abs=1e-6)


def test_pooled_accuracy_counts_answers_over_seeds():
    records = [
        {"accuracy": 0.30000001192092896, "eval_questions": 400},  # float32 fraction: 120 correct
        {"accuracy": 0.25, "eval_questions": 200},
        {"accuracy": None, "eval_questions": 400},  # not scored: left out
        {"accuracy": 0.5, "eval_questions": 0},
    ]
    pooled = report.pooled_accuracy(records, "accuracy", "eval_questions")
    assert pooled == report.wilson(170, 600)


# ----- rescoring on common questions and the summary ---------------------------------------------------------
def test_on_common_questions_rescoring_on_shortest_prefix():
    short = result("lora", 0, accuracy=0.25, eval_questions=400, gsm8k_correct="1" * 100 + "0" * 300)
    verdicts = "1" * 40 + "0" * 360 + "1" * 500 + "0" * 419  # 40 right in the first 400, 540 in all 1319
    long = result("lora", 1, accuracy=540 / 1319, eval_questions=1319, gsm8k_correct=verdicts)
    unscored = result("lora", 2, accuracy=0.5, eval_questions=1319)  # no verdicts: cannot be rescored
    records = [short, long, unscored]
    originals = json.loads(json.dumps(records))

    rescored = report.on_common_questions(records)

    assert rescored[0] == short
    assert rescored[1]["accuracy"] == pytest.approx(0.1)
    assert rescored[1]["eval_questions"] == 400
    assert rescored[1]["accuracy_all"] == pytest.approx(540 / 1319)
    assert rescored[1]["eval_questions_all"] == 1319
    assert rescored[2] == unscored and "accuracy_all" not in rescored[2]
    assert records == originals  # the input records are not modified


def test_on_common_questions_without_counts_is_a_no_op():
    records = [{"method": "lora", "seed": 0, "accuracy": 0.3}]
    assert report.on_common_questions(records) is records


def test_summarise_per_method_entries():
    summary = report.summarise(study_results(), [])
    assert list(summary["methods"]) == ["base", "lora", "peft-lora"]  # ORDER, not input order
    lora = summary["methods"]["lora"]
    assert lora["label"] == "ours LoRA"
    assert lora["seeds"] == [0, 1, 2]
    assert lora["lr"] == [5e-4]
    assert lora["trainable_parameters"] == 1_000
    assert lora["test_loss"]["mean"] == pytest.approx(0.85)
    assert lora["test_loss"]["ci95"] == pytest.approx(4.3027 * 0.05 / math.sqrt(3))
    assert lora["accuracy"]["mean"] == pytest.approx(0.35)
    assert lora["accuracy_pooled"] == report.wilson(420, 1200)
    assert lora["math500_accuracy"]["mean"] == pytest.approx(0.14)
    assert lora["math500_accuracy_pooled"] == report.wilson(210, 1500)
    assert lora["math500_questions"] == [500]
    assert lora["eval_questions"] == [400]
    assert summary["methods"]["base"]["lr"] == []
    assert "math500_accuracy" not in summary["methods"]["base"]
    assert summary["grid"] == {}


def test_summarise_rescored_accuracy_and_all_questions():
    results = [
        result("lora", 0, accuracy=0.25, eval_questions=400, gsm8k_correct="1" * 100 + "0" * 300),
        result("lora", 1, accuracy=0.5, eval_questions=800, gsm8k_correct="1" * 200 + "0" * 200 + "1" * 400),
    ]
    lora = report.summarise(results, [])["methods"]["lora"]
    assert lora["accuracy"]["values"] == [0.25, 0.5]
    assert lora["eval_questions"] == [400]
    assert lora["accuracy_pooled"] == report.wilson(300, 800)
    assert lora["accuracy_all_questions"] == {1: [0.5, 800]}


def test_summarise_ours_minus_peft_paired_by_seed():
    results = study_results() + [result("pissa", 0, test_loss=0.8), result("peft-olora", 0, test_loss=0.8)]
    pairs = report.summarise(results, [])["ours_vs_peft"]
    assert list(pairs) == ["lora"]  # pissa has no PEFT twin, peft-olora has no ours
    pair = pairs["lora"]
    assert pair["seeds"] == [1, 2]  # lora has 0–2, peft-lora 1–3
    assert pair["test_loss"]["values"] == pytest.approx([0.80 - 0.82, 0.85 - 0.86])
    assert pair["test_loss"]["mean"] == pytest.approx(-0.015)
    assert pair["test_loss"]["ci95"] == pytest.approx(12.7062 * 0.005, rel=1e-6)  # s = 0.01/√2, n = 2
    assert pair["accuracy"]["values"] == pytest.approx([0.02, -0.01])
    # MATH-500: only seed 1 has it on both sides, so one difference and no interval.
    assert pair["math500_accuracy"]["values"] == pytest.approx([0.14 - 0.10])
    assert pair["math500_accuracy"]["ci95"] is None


@pytest.mark.parametrize(
    "only_first, only_second, expected",
    [
        (0, 0, 1.0),  # nothing discordant: no evidence either way
        (4, 4, 1.0),
        (0, 5, 2 / 32),  # 2 · P(X ≤ 0), X ~ Bin(5, ½)
        (9, 1, 2 * (1 + 10) / 1024),  # symmetric in its arguments
        (1, 9, 2 * (1 + 10) / 1024),
        (6, 15, 2 * 82_160 / 2**21),  # Σ_{k≤6} C(21, k) = 1 + 21 + 210 + 1330 + 5985 + 20349 + 54264
    ],
)
def test_mcnemar_exact(only_first, only_second, expected):
    assert report.mcnemar_exact(only_first, only_second) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_exact_large_counts_and_bad_input():
    # 600 vs 400 discordant answers: far from even, and the big binomial coefficients must not overflow.
    assert 0 < report.mcnemar_exact(600, 400) < 1e-9
    with pytest.raises(ValueError, match="non-negative"):
        report.mcnemar_exact(-1, 3)


def test_summarise_pairs_per_question_verdicts_over_common_questions():
    results = [
        # seed 0: ours right on q0, q1; PEFT right on q1, q2 → 1 ours only (q0), 1 PEFT only (q2)
        result("lora", 0, test_loss=0.8, accuracy=0.5, gsm8k_correct="1100", math500_correct="10"),
        result("peft-lora", 0, test_loss=0.8, accuracy=0.5, gsm8k_correct="0110", math500_correct="00"),
        # seed 1: PEFT scored one question more; only the first three compare → q2 PEFT only
        result("lora", 1, test_loss=0.8, accuracy=0.0, gsm8k_correct="000"),
        result("peft-lora", 1, test_loss=0.8, accuracy=0.5, gsm8k_correct="0011"),
    ]
    pair = report.summarise(results, [])["ours_vs_peft"]["lora"]
    assert pair["gsm8k_mcnemar"] == {"ours_only": 1, "peft_only": 2, "questions": 7, "p": 1.0}
    # MATH-500 verdicts only for seed 0: 1 ours only of 2 questions, p = 2 · ½.
    assert pair["math500_mcnemar"] == {"ours_only": 1, "peft_only": 0, "questions": 2, "p": 1.0}
    assert "gsm8k_mcnemar" not in report.summarise(study_results(), [])["ours_vs_peft"]["lora"]


def test_summarise_grid_best():
    grid = report.summarise(study_results(), GRID)["grid"]
    assert grid["best"]["lora"]["lr"] == 5e-4
    assert grid["best"]["lora"]["losses"] == {
        "0.0001": pytest.approx(1.0),
        "0.0005": pytest.approx(0.925),
        "0.001": pytest.approx(0.95),
    }
    assert "base" not in grid["best"]
    assert grid["rows"] == len(GRID)
    assert grid["steps"] == [100]
    assert grid["heldout_examples"] == [500]
    json.dumps(grid)  # the summary is written as JSON: string keys only


# ----- collect: merging and the learning-rate grid -----------------------------------------------------------
def test_merge_records_latest_finished_wins():
    new = result("lora", 0, accuracy=0.4, finished_at="2026-11-23T16:00:00+00:00")
    old = result("lora", 0, accuracy=0.3, finished_at="2026-11-23T15:00:00+00:00")
    undated = result("lora", 0, accuracy=0.2)  # an older file without timestamps
    assert collect.merge_records([new, old, undated], collect.KEYS["results"]) == [new]
    assert collect.merge_records([undated, old], collect.KEYS["results"]) == [old]


def test_merge_records_ties_go_to_the_one_read_last():
    first, second = result("lora", 0, accuracy=0.1), result("lora", 0, accuracy=0.2)
    assert collect.merge_records([first, second], collect.KEYS["results"]) == [second]
    stamp = "2026-11-23T16:00:00+00:00"
    first, second = first | {"finished_at": stamp}, second | {"finished_at": stamp}
    assert collect.merge_records([first, second], collect.KEYS["results"]) == [second]


def test_merge_records_key_and_order():
    rows = [
        grid_row("sorsa", 1, 1e-3, 0.9),
        grid_row("lora", 0, 5e-4, 0.9),
        grid_row("sorsa", 0, 1e-3, 0.9),
        grid_row("sorsa", 0, 1e-4, 0.9),
        grid_row("lora", 0, 1e-4, 0.9),
    ]
    merged = collect.merge_records(rows, collect.KEYS["grid"])
    # Every row has its own (method, seed, lr); sorted by first appearance of the method, then seed, then lr.
    assert [(r["method"], r["seed"], r["lr"]) for r in merged] == [
        ("sorsa", 0, 1e-4),
        ("sorsa", 0, 1e-3),
        ("sorsa", 1, 1e-3),
        ("lora", 0, 1e-4),
        ("lora", 0, 5e-4),
    ]
    # With the results key the learning rate is not part of the identity.
    assert len(collect.merge_records(rows, collect.KEYS["results"])) == 3


def test_load_records_merges_shards(tmp_path, capsys):
    old = result("lora", 0, accuracy=0.3, finished_at="2026-11-23T15:00:00+00:00")
    rerun = result("lora", 0, accuracy=0.4, finished_at="2026-11-23T16:00:00+00:00")
    pissa = result("pissa", 0, accuracy=0.2, finished_at="2026-11-23T15:30:00+00:00")
    collect.write_jsonl(tmp_path / "results.jsonl", [old])
    (tmp_path / "results.shard0.jsonl").write_text(json.dumps(rerun) + "\n\n" + '{"method": "lo')  # killed
    collect.write_jsonl(tmp_path / "results.shard1.jsonl", [pissa])

    records = collect.load_records(tmp_path, "results")
    assert records == [rerun, pissa]
    assert "skipping a line that is not JSON" in capsys.readouterr().out

    collect.write_jsonl(tmp_path / "results.jsonl", records)  # what collect.py main() does
    assert collect.load_records(tmp_path, "results") == records  # collecting twice: the same
    assert collect.load_records(tmp_path, "grid") == []


def test_best_learning_rate_is_lowest_seed_mean():
    best = collect.best_learning_rates(GRID)
    # lora 1e-4 has the single best run (0.80) but the worst mean (1.00): the mean decides.
    assert best["lora"]["lr"] == 5e-4
    assert best["lora"]["heldout_loss"] == pytest.approx(0.925)
    assert best["lora"]["seeds"] == 2
    assert best["lora"]["losses"] == {1e-4: pytest.approx(1.0), 5e-4: pytest.approx(0.925), 1e-3: pytest.approx(0.95)}
    assert best["pissa"] == {"lr": 1e-4, "heldout_loss": 0.97, "seeds": 1, "losses": {1e-4: 0.97, 5e-4: 0.99}}
    assert "base" not in best  # no learning rate


def test_best_learning_rate_skips_diverged_runs():
    rows = [
        grid_row("lora", 0, 1e-4, 1.0),
        grid_row("lora", 0, 1e-2, float("nan")),  # diverged: must not win
        grid_row("lora", 0, 5e-2, None),
        grid_row("sorsa", 0, 1e-2, float("inf")),
    ]
    best = collect.best_learning_rates(rows)
    assert best == {"lora": {"lr": 1e-4, "heldout_loss": 1.0, "seeds": 1, "losses": {1e-4: 1.0, 1e-2: math.inf}}}


def test_a_learning_rate_where_one_seed_diverged_is_disqualified():
    rows = [
        grid_row("lora", 0, 1e-3, 0.95),
        grid_row("lora", 1, 1e-3, 0.97),
        grid_row("lora", 0, 5e-3, 0.80),  # the best run of all …
        grid_row("lora", 1, 5e-3, float("nan")),  # … but another seed diverged at the same rate
    ]
    best = collect.best_learning_rates(rows)["lora"]
    assert best["lr"] == 1e-3
    assert best["heldout_loss"] == pytest.approx(0.96)
    assert best["losses"][5e-3] == math.inf


# ----- markdown ----------------------------------------------------------------------------------------------
def table_after(lines: list[str], header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and row cells of the markdown table whose header line starts with ``header_start``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [cell.strip() for cell in lines[start].strip("|").split("|")], rows


def test_markdown_results_pairs_grid_and_figure(tmp_path):
    results = study_results()
    summary = report.summarise(results, GRID)
    page = report.markdown(summary, GRID, tmp_path / "images" / "curves.png", tmp_path / "results" / "page.md")
    lines = page.splitlines()

    header, rows = table_after(lines, "| method | seeds")
    assert "MATH-500 acc." in header
    assert [row[0] for row in rows] == ["untrained", "ours LoRA", "PEFT LoRA"]  # one row per method
    lora = dict(zip(header, rows[1], strict=True))
    assert lora["seeds"] == "3"
    assert lora["trainable params"] == "1,000"
    assert lora["LR"] == "0.0005"
    assert lora["GSM8K acc."] == f"35.00 ± {100 * 4.3027 * 0.05 / math.sqrt(3):.2f} %"
    assert lora["GSM8K acc. pooled"].endswith("(420/1200)")
    assert lora["MATH-500 acc."] == f"14.00 ± {100 * 4.3027 * 0.02 / math.sqrt(3):.2f} %"  # all 3 seeds: no note
    assert dict(zip(header, rows[0], strict=True))["MATH-500 acc."] == "–"
    assert dict(zip(header, rows[2], strict=True))["MATH-500 acc."] == "10.00 % (seed 1)"  # 1 of 3 seeds
    assert dict(zip(header, rows[2], strict=True))["LR"] == "0.0005"

    _, pair_rows = table_after(lines, "| pair |")
    assert pair_rows == [["ours LoRA − PEFT LoRA", "2", "-0.0150 ± 0.0635", "0.50 ± 19.06 pt", "4.00 pt", "–", "–"]]

    with_verdicts = [
        r | {"gsm8k_correct": "1" * 10 + "0" * 390 if r["method"] == "lora" else "0" * 400} for r in results
    ]
    verdict_page = report.markdown(report.summarise(with_verdicts, []), [], None, tmp_path / "page.md")
    pair_header, pair_rows = table_after(verdict_page.splitlines(), "| pair |")
    discordant = dict(zip(pair_header, pair_rows[0], strict=True))
    assert discordant["GSM8K ours only / PEFT only (McNemar p)"] == "20 / 0 (p 0.00)"  # 10 per paired seed
    assert discordant["MATH-500 ours only / PEFT only (McNemar p)"] == "–"

    grid_header, grid_rows = table_after(lines, "| method | 0.0001")
    assert grid_header == ["method", "0.0001", "0.0005", "0.001"]
    assert grid_rows == [
        ["ours LoRA", "1.0000", "**0.9250**", "0.9500"],
        ["ours PiSSA", "**0.9700**", "0.9900", "–"],
    ]
    assert "Untrained model: 1.4500." in page
    assert "![Training and held-out loss](../images/curves.png)" in page


def test_markdown_grid_only():
    page = report.markdown(report.summarise([], GRID), GRID, None, Path("page.md"))
    assert "| method | seeds" not in page and "## Ours − PEFT" not in page and "## Loss curves" not in page
    assert "## Learning-rate grid" in page


# ----- loss curves and the figure ----------------------------------------------------------------------------
def test_seed_mean_and_ema():
    assert report.seed_mean([{0: 1.0, 5: 2.0, 9: 7.0}, {0: 3.0, 5: 4.0}, {}]) == ([0, 5], [2.0, 3.0])
    assert report.seed_mean([{0: 1.0}, {5: 3.0}]) == ([0, 5], [1.0, 3.0])  # no common step: every step
    assert report.seed_mean([{}]) == ([], [])
    assert report.ema([1.0, 2.0, 3.0], 0.5) == [1.0, 1.5, 2.25]
    assert report.ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]


@pytest.fixture
def subplots_calls(monkeypatch) -> list[tuple]:
    """Record ``plt.subplots`` calls as ``(args, figure)`` while still drawing the figure."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = []
    real = plt.subplots

    def recording(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        calls.append((args, kwargs, fig))
        return fig, axes

    monkeypatch.setattr(plt, "subplots", recording)
    return calls


def test_records_only_curves_give_one_panel(tmp_path, subplots_calls):
    results = [
        result("lora", 0, heldout_curve=[[0, 1.5], [50, 1.2], [100, 1.0]]),
        result("lora", 1, heldout_curve=[[0, 1.3], [50, 1.0], [100, 0.8], [150, 0.7]]),
        result("lora", 2),  # no stored curve: not part of the mean nor of the seed count
        result("peft-lora", 0, heldout_curve=[[0, 1.5], [100, 1.1]]),
        result("base", 0),
    ]
    curves = report.loss_curves(tmp_path / "no-runs", results, smoothing=0.6)
    assert sorted(curves) == ["lora", "peft-lora"]
    lora = curves["lora"]
    assert lora["seeds"] == [0, 1]
    assert lora["train"] == ([], []) and lora["train_smoothed"] == ([], [])
    assert lora["heldout"][0] == [0, 50, 100]
    assert lora["heldout"][1] == pytest.approx([1.4, 1.1, 0.9])

    path = report.plot_curves(curves, tmp_path / "images" / "curves.png", smoothing=0.6)

    assert path.read_bytes()[:8] == PNG_MAGIC
    ((args, kwargs, fig),) = subplots_calls
    assert args[:2] == (1, 1)
    assert len(fig.axes) == 1  # no empty training panel
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["ours LoRA (n=2)", "PEFT LoRA (n=1)"]


def test_records_with_training_curves_give_both_panels(tmp_path, subplots_calls):
    results = [
        result("sorsa", 0, heldout_curve=[[0, 1.5], [100, 1.0]], train_curve=[[10, 2.0], [20, 1.6], [30, 1.2]]),
        result("sorsa", 1, heldout_curve=[[0, 1.3], [100, 0.8]], train_curve=[[10, 1.0], [20, 0.8], [30, 0.6]]),
        # one seed without a training curve (an older record): the training curve is seed 0's alone
        result("pissa", 0, heldout_curve=[[0, 1.5], [100, 1.1]], train_curve=[[10, 2.0], [20, 1.8]]),
        result("pissa", 1, heldout_curve=[[0, 1.4], [100, 1.0]]),
    ]
    curves = report.loss_curves(tmp_path / "no-runs", results, smoothing=0.5)
    sorsa = curves["sorsa"]
    assert sorsa["train"][0] == [10, 20, 30]
    assert sorsa["train"][1] == pytest.approx([1.5, 1.2, 0.9])
    assert sorsa["train_smoothed"][1] == pytest.approx(report.ema([1.5, 1.2, 0.9], 0.5))
    assert sorsa["train_seeds"] == sorsa["seeds"] == [0, 1]
    assert curves["pissa"]["train"] == ([10, 20], [2.0, 1.8])
    assert curves["pissa"]["train_seeds"] == [0]
    assert curves["pissa"]["seeds"] == [0, 1]

    report.plot_curves(curves, tmp_path / "curves.png", smoothing=0.5)
    ((args, kwargs, fig),) = subplots_calls
    assert args[:2] == (1, 2) and len(fig.axes) == 2
    train_ax, heldout_ax = fig.axes
    # each panel counts its own seeds
    assert train_ax.get_legend_handles_labels()[1] == ["ours PiSSA (n=1)", "ours SORSA (n=2)"]
    assert train_ax.get_legend() is not None
    assert heldout_ax.get_legend_handles_labels()[1] == ["ours PiSSA (n=2)", "ours SORSA (n=2)"]


def write_events(run_dir: Path, train: dict[int, float], heldout: dict[int, float], suffix: str = "") -> Path:
    """A TensorBoard event file with ``train/loss`` and ``heldout/loss`` scalars, as the study's logger writes."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir), filename_suffix=suffix)
    for step, value in train.items():
        writer.add_scalar("train/loss", value, step)
    for step, value in heldout.items():
        writer.add_scalar("heldout/loss", value, step)
    writer.close()
    (path,) = run_dir.glob(f"events.out.tfevents.*{suffix}")
    return path


def test_tensorboard_curves_give_two_panels(tmp_path, subplots_calls):
    pytest.importorskip("tensorboard")
    runs = tmp_path / "runs"
    steps = range(1, 11)
    # Seed 0 was run twice: only the newer event file may be read.
    stale = write_events(runs / "lora" / "seed0", {s: 9.0 for s in steps}, {0: 9.0, 10: 9.0}, suffix=".old")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    write_events(runs / "lora" / "seed0", {s: 2.0 for s in steps}, {0: 1.6, 10: 1.0}, suffix=".new")
    write_events(runs / "lora" / "seed1", {s: 4.0 for s in steps}, {0: 1.4, 10: 0.8})
    write_events(runs / "lora" / "seed7", {s: 100.0 for s in steps}, {0: 100.0})  # crashed: no record
    write_events(runs / "peft-lora" / "seed0", {s: 3.0 for s in steps}, {})
    results = [result("lora", 0), result("lora", 1), result("peft-lora", 0)]

    curves = report.loss_curves(runs, results, smoothing=0.5)

    lora = curves["lora"]
    assert lora["seeds"] == [0, 1]
    assert lora["train"] == (list(steps), pytest.approx([3.0] * 10))
    assert lora["train_smoothed"] == (list(steps), pytest.approx(report.ema([3.0] * 10, 0.5)))
    assert lora["heldout"] == ([0, 10], pytest.approx([1.5, 0.9]))
    assert curves["peft-lora"]["heldout"] == ([], [])

    path = report.plot_curves(curves, tmp_path / "curves.png", smoothing=0.5)

    assert path.read_bytes()[:8] == PNG_MAGIC
    ((args, kwargs, fig),) = subplots_calls
    assert args[:2] == (1, 2)
    assert len(fig.axes) == 2
    train_ax, heldout_ax = fig.axes
    assert "training loss" in train_ax.get_title() and "held-out" in heldout_ax.get_title()
    assert heldout_ax.get_legend() is not None
