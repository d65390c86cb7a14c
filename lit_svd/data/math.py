"""Math datamodules: GSM8K, MATH (incl. MATH-500) and MetaMathQA.

Where the records come from (Hub ids are the defaults; ``data_dir`` switches to local files):

- GSM8K: Hub ``openai/gsm8k`` (configuration "main"); local ``train.jsonl`` / ``test.jsonl`` with
  ``{question, answer}``, the answer ending in ``#### N``.
- MATH: Hub ``EleutherAI/hendrycks_math`` (7 subject configurations) for training and
  ``HuggingFaceH4/MATH-500`` for evaluation; local ``train.jsonl`` / ``test.jsonl`` with
  ``{problem, solution}`` (+ ``answer`` in MATH-500).
- MetaMathQA: Hub ``meta-math/MetaMathQA``; local ``MetaMathQA-395K.json`` with
  ``{query, response, type, original_question}``.

MetaMathQA is training data only; it is evaluated on GSM8K and/or MATH (the MetaMath / PiSSA / SORSA
protocol), loaded with the same functions as the two datamodules above.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from datasets import Dataset, concatenate_datasets

from lit_svd.data.base import (
    BadRecords,
    InstructionDataModule,
    RecordProblems,
    load_hub_split,
    load_json_records,
    resolve_file,
)
from lit_svd.eval.answers import gsm8k_reference, last_boxed, math_answer
from lit_svd.eval.metrics import GSM8KAccuracy, MATHAccuracy, TaskAccuracy

__all__ = [
    "GSM8KDataModule",
    "GSM8K_HUB_ID",
    "MATH500_HUB_ID",
    "MATHDataModule",
    "MATH_HUB_ID",
    "MATH_SUBJECTS",
    "METAMATHQA_HUB_ID",
    "MetaMathQADataModule",
    "clean_gsm8k_solution",
    "load_gsm8k",
    "load_math",
    "load_metamathqa",
]

GSM8K_HUB_ID = "openai/gsm8k"
MATH_HUB_ID = "EleutherAI/hendrycks_math"
MATH500_HUB_ID = "HuggingFaceH4/MATH-500"
METAMATHQA_HUB_ID = "meta-math/MetaMathQA"
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
"""Configurations of ``EleutherAI/hendrycks_math`` (one per subject); the datamodule loads all of them."""

GSM8K_COLUMNS = ("question", "answer")
MATH_COLUMNS = ("problem", "solution")
METAMATHQA_COLUMNS = ("query", "response")

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def clean_gsm8k_solution(solution: str) -> str:
    """Rewrite a GSM8K solution in MetaMathQA's style: no ``<<a*b=c>>`` annotations, "The answer is: N".

    Args:
        solution: GSM8K's ``answer`` field, e.g. ``"... = $<<9*2=18>>18 ...\\n#### 18"``.

    Returns:
        ``"... = $18 ...\\nThe answer is: 18"``: the answer line that evaluation looks for first.
    """
    body, _, answer = solution.rpartition("####")
    return f"{_CALCULATOR_ANNOTATION.sub('', body).rstrip()}\nThe answer is: {answer.strip()}"


def _gsm8k_answer_problem(record: dict) -> str | None:
    """Why a raw GSM8K record cannot be trained or scored on (no ``#### N`` number), or ``None``."""
    try:
        gsm8k_reference(record["answer"])
    except ValueError:
        return "no '#### N' numeric answer"
    return None


def _gsm8k_records(batch: dict[str, list], source: str, clean_solutions: bool) -> dict[str, list]:
    references = []
    for solution in batch["answer"]:
        try:
            references.append(gsm8k_reference(solution))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    responses = [clean_gsm8k_solution(solution) if clean_solutions else solution for solution in batch["answer"]]
    count = len(responses)
    return {
        "query": batch["question"],
        "input": [""] * count,
        "response": responses,
        "reference": references,
        "task": ["gsm8k"] * count,
    }


def _math_records(batch: dict[str, list], source: str) -> dict[str, list]:
    solutions = batch["solution"]
    if "answer" in batch:  # MATH-500 gives the final answer; it equals the last \boxed{} of the solution
        references = [str(answer) for answer in batch["answer"]]
    else:  # Hendrycks' MATH: the answer is the last \boxed{} (or \fbox{}) in the solution
        references = [last_boxed(solution) or "" for solution in solutions]
    count = len(solutions)
    return {
        "query": batch["problem"],
        "input": [""] * count,
        "response": solutions,
        "reference": references,
        "task": ["math"] * count,
    }


def _metamathqa_records(batch: dict[str, list]) -> dict[str, list]:
    responses = batch["response"]
    count = len(responses)
    types = batch.get("type") or [""] * count
    # GSM_AnsAug / GSM_Rephrased / GSM_SV / GSM_FOBAR come from GSM8K, MATH_* from MATH.
    tasks = ["gsm8k" if kind.startswith("GSM") else "math" if kind.startswith("MATH") else "" for kind in types]
    return {
        "query": batch["query"],
        "input": [""] * count,
        "response": responses,
        "reference": [math_answer(response) or "" for response in responses],
        "task": tasks,
    }


def _head(records: Dataset, count: int | None) -> Dataset:
    return records if count is None or count >= len(records) else records.select(range(count))


def load_gsm8k(
    split: Literal["train", "test"],
    data_dir: str | None = None,
    file: str | None = None,
    hub_id: str = GSM8K_HUB_ID,
    cache_dir: str | None = None,
    clean_solutions: bool = True,
    bad_records: BadRecords = "error",
    report: list[RecordProblems] | None = None,
) -> Dataset:
    """GSM8K as canonical records (``query``, ``input``, ``response``, ``reference``, ``task="gsm8k"``).

    Args:
        split: ``"train"`` (7473 problems) or ``"test"`` (1319).
        data_dir: folder with ``train.jsonl`` / ``test.jsonl``; ``None`` loads ``hub_id`` from the Hub.
        file: file name (or absolute path) overriding ``f"{split}.jsonl"``.
        hub_id: Hub dataset id (configuration ``"main"``).
        cache_dir: ``datasets`` cache folder.
        clean_solutions: train on MetaMath-style responses (see :func:`clean_gsm8k_solution`) instead of the
            raw solutions with calculator annotations and ``#### N``.
        bad_records: a local file's bad records, incl. a solution without a ``#### N`` number:
            ``"error"`` or ``"skip"`` (see :func:`~lit_svd.data.base.load_json_records`).
        report: collects the file's bad records.

    Returns:
        The records; ``reference`` is the normalised final number.
    """
    if data_dir is not None or file is not None:
        path = resolve_file(data_dir, file or f"{split}.jsonl")
        raw = load_json_records(
            path, GSM8K_COLUMNS, cache_dir, bad_records=bad_records, check=_gsm8k_answer_problem, report=report
        )
        source = str(path)
    else:
        hint = "pass data_dir='path/to/gsm8k' (a folder with train.jsonl and test.jsonl)"
        raw = load_hub_split(
            hub_id, "main", split, GSM8K_COLUMNS, cache_dir, hint, bad_records, _gsm8k_answer_problem, report
        )
        source = f"{hub_id} ({split})"
    return raw.map(
        _gsm8k_records,
        batched=True,
        remove_columns=raw.column_names,
        fn_kwargs={"source": source, "clean_solutions": clean_solutions},
        desc="GSM8K records",
    )


def load_math(
    split: Literal["train", "test"],
    data_dir: str | None = None,
    file: str | None = None,
    hub_id: str = MATH_HUB_ID,
    test_hub_id: str | None = MATH500_HUB_ID,
    cache_dir: str | None = None,
    bad_records: BadRecords = "error",
    report: list[RecordProblems] | None = None,
) -> Dataset:
    """MATH as canonical records (``task="math"``); the test split defaults to MATH-500.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: folder with ``train.jsonl`` / ``test.jsonl`` in MATH's (``problem``, ``solution``) or
            MATH-500's (``problem``, ``solution``, ``answer``) schema; ``None`` loads from the Hub.
        file: file name (or absolute path) overriding ``f"{split}.jsonl"``.
        hub_id: Hub id of the full MATH dataset (all :data:`MATH_SUBJECTS` are concatenated).
        test_hub_id: Hub id for the test split (MATH-500); ``None`` uses ``hub_id``'s 5000-problem test set.
        cache_dir: ``datasets`` cache folder.

    Returns:
        The records; ``reference`` is the ``answer`` field when present, else the last ``\\boxed{}`` of the
        solution (empty when the solution has none).
    """
    if data_dir is not None or file is not None:
        path = resolve_file(data_dir, file or f"{split}.jsonl")
        raw = load_json_records(path, MATH_COLUMNS, cache_dir, bad_records=bad_records, report=report)
        source = str(path)
    else:
        hint = "pass data_dir='path/to/math' (a folder with train.jsonl / test.jsonl, e.g. MATH-500's)"
        if split == "test" and test_hub_id is not None:
            raw = load_hub_split(test_hub_id, None, "test", MATH_COLUMNS, cache_dir, hint, bad_records, report=report)
            source = f"{test_hub_id} (test)"
        else:
            parts = [
                load_hub_split(hub_id, subject, split, MATH_COLUMNS, cache_dir, hint, bad_records, report=report)
                for subject in MATH_SUBJECTS
            ]
            raw = concatenate_datasets([part.select_columns(list(MATH_COLUMNS)) for part in parts])
            source = f"{hub_id} ({split})"
    return raw.map(
        _math_records,
        batched=True,
        remove_columns=raw.column_names,
        fn_kwargs={"source": source},
        desc="MATH records",
    )


def load_metamathqa(
    data_dir: str | None = None,
    file: str = "MetaMathQA-395K.json",
    hub_id: str = METAMATHQA_HUB_ID,
    split: str = "train",
    cache_dir: str | None = None,
    bad_records: BadRecords = "error",
    report: list[RecordProblems] | None = None,
) -> Dataset:
    """MetaMathQA as canonical records (``task`` is ``"gsm8k"`` / ``"math"`` from the ``type`` field).

    Args:
        data_dir: folder with ``file``; ``None`` loads ``hub_id`` from the Hub.
        file: the JSON file name (or an absolute path).
        hub_id: Hub dataset id.
        split: ``datasets`` split expression, e.g. ``"train[:100000]"``.
        cache_dir: ``datasets`` cache folder.

    Returns:
        The records in file order.
    """
    if data_dir is not None or resolve_file(None, file).is_absolute():
        raw = load_json_records(
            resolve_file(data_dir, file), METAMATHQA_COLUMNS, cache_dir, split, bad_records=bad_records, report=report
        )
    else:
        hint = f"pass data_dir='path/to/metamathqa' (a folder with {file})"
        raw = load_hub_split(hub_id, None, split, METAMATHQA_COLUMNS, cache_dir, hint, bad_records, report=report)
    return raw.map(_metamathqa_records, batched=True, remove_columns=raw.column_names, desc="MetaMathQA records")


class GSM8KDataModule(InstructionDataModule):
    """GSM8K (grade-school math word problems): train on the 7473 training solutions, evaluate on the 1319
    test problems by generation and numeric match (:class:`~lit_svd.eval.metrics.GSM8KAccuracy`).

    Example::

        dm = GSM8KDataModule(data_dir="data/gsm8k", max_length=512, batch_size=8)
        dm.set_tokenizer(tokenizer)

    Args:
        hub_id: Hub dataset id used when ``data_dir`` is ``None`` (configuration ``"main"``).
        train_file: training file inside ``data_dir``.
        test_file: test file inside ``data_dir``.
        clean_solutions: train on MetaMath-style responses ("The answer is: N", no ``<<...>>`` calculator
            annotations) instead of the raw GSM8K solutions.
        **kwargs: the :class:`~lit_svd.data.base.InstructionDataModule` arguments (``tokenizer``,
            ``data_dir``, ``prompt_template``, ``max_length``, ``batch_size``, ...).
    """

    def __init__(
        self,
        hub_id: str = GSM8K_HUB_ID,
        train_file: str = "train.jsonl",
        test_file: str = "test.jsonl",
        clean_solutions: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hub_id = hub_id
        self.train_file = train_file
        self.test_file = test_file
        self.clean_solutions = clean_solutions

    def _load(self, split: Literal["train", "test"], file: str) -> Dataset:
        return load_gsm8k(
            split,
            self.data_dir,
            file if self.data_dir is not None else None,
            self.hub_id,
            self.cache_dir,
            self.clean_solutions,
            bad_records=self.bad_records,
            report=self.bad_record_report,
        )

    def _load_train_records(self) -> Dataset:
        return self._load("train", self.train_file)

    def _load_eval_records(self) -> Dataset:
        return _head(self._load("test", self.test_file), self.max_eval_examples)

    def make_metric(self) -> GSM8KAccuracy:
        """A fresh :class:`~lit_svd.eval.metrics.GSM8KAccuracy`."""
        return GSM8KAccuracy()


class MATHDataModule(InstructionDataModule):
    """MATH (competition mathematics): train on MATH's 7500 training solutions, evaluate on MATH-500 (or
    the full 5000-problem test set) by normalised ``\\boxed{}`` match
    (:class:`~lit_svd.eval.metrics.MATHAccuracy`).

    Example::

        dm = MATHDataModule(data_dir="data/math500")   # local MATH-500 for evaluation
        dm.set_tokenizer(tokenizer); dm.setup("test")

    Args:
        hub_id: Hub id of MATH (all subjects are concatenated), used when ``data_dir`` is ``None``.
        test_hub_id: Hub id of the evaluation set (MATH-500); ``None``: ``hub_id``'s full test split.
        train_file: training file inside ``data_dir`` (``{problem, solution}`` records).
        test_file: test file inside ``data_dir`` (MATH-500's ``{problem, solution, answer}`` or MATH's).
        **kwargs: the :class:`~lit_svd.data.base.InstructionDataModule` arguments.
    """

    def __init__(
        self,
        hub_id: str = MATH_HUB_ID,
        test_hub_id: str | None = MATH500_HUB_ID,
        train_file: str = "train.jsonl",
        test_file: str = "test.jsonl",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hub_id = hub_id
        self.test_hub_id = test_hub_id
        self.train_file = train_file
        self.test_file = test_file

    def _load(self, split: Literal["train", "test"], file: str) -> Dataset:
        local_file = file if self.data_dir is not None else None
        return load_math(
            split,
            self.data_dir,
            local_file,
            self.hub_id,
            self.test_hub_id,
            self.cache_dir,
            bad_records=self.bad_records,
            report=self.bad_record_report,
        )

    def _load_train_records(self) -> Dataset:
        return self._load("train", self.train_file)

    def _load_eval_records(self) -> Dataset:
        return _head(self._load("test", self.test_file), self.max_eval_examples)

    def make_metric(self) -> MATHAccuracy:
        """A fresh :class:`~lit_svd.eval.metrics.MATHAccuracy`."""
        return MATHAccuracy()


class MetaMathQADataModule(InstructionDataModule):
    """MetaMathQA for training (first ``subset_size`` records, like the PiSSA/SORSA papers' first 100K),
    GSM8K and/or MATH for evaluation.

    Example::

        dm = MetaMathQADataModule(subset_size=100_000, eval_datasets=["gsm8k", "math"],
                                  gsm8k_dir="data/gsm8k", math_dir="data/math500")

    Args:
        hub_id: Hub id of MetaMathQA, used when ``data_dir`` is ``None``.
        train_file: the JSON file inside ``data_dir`` (or an absolute path).
        split: ``datasets`` split expression applied when loading (e.g. ``"train[:100000]"``).
        subset_size: keep the first N records (100K in the papers); ``None`` keeps all 395K.
        eval_datasets: evaluation sets, any of ``"gsm8k"`` and ``"math"`` (default: ``["gsm8k"]``).
        gsm8k_dir: folder with GSM8K's ``test.jsonl``; ``None`` loads ``openai/gsm8k`` from the Hub.
        math_dir: folder with MATH's / MATH-500's ``test.jsonl``; ``None`` loads MATH-500 from the Hub.
        gsm8k_hub_id: Hub id of GSM8K.
        math_test_hub_id: Hub id of the MATH evaluation set.
        **kwargs: the :class:`~lit_svd.data.base.InstructionDataModule` arguments (``data_dir`` here is the
            MetaMathQA folder).
    """

    def __init__(
        self,
        hub_id: str = METAMATHQA_HUB_ID,
        train_file: str = "MetaMathQA-395K.json",
        split: str = "train",
        subset_size: int | None = 100_000,
        eval_datasets: list[str] | None = None,
        gsm8k_dir: str | None = None,
        math_dir: str | None = None,
        gsm8k_hub_id: str = GSM8K_HUB_ID,
        math_test_hub_id: str = MATH500_HUB_ID,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        eval_datasets = list(eval_datasets) if eval_datasets is not None else ["gsm8k"]
        unknown = [name for name in eval_datasets if name not in ("gsm8k", "math")]
        if unknown or not eval_datasets:
            raise ValueError(f"eval_datasets must be a non-empty list of 'gsm8k' and/or 'math', got {eval_datasets}")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size must be positive or None, got {subset_size}")
        self.hub_id = hub_id
        self.train_file = train_file
        self.split = split
        self.subset_size = subset_size
        self.eval_datasets: Sequence[str] = eval_datasets
        self.gsm8k_dir = gsm8k_dir
        self.math_dir = math_dir
        self.gsm8k_hub_id = gsm8k_hub_id
        self.math_test_hub_id = math_test_hub_id

    def _load_train_records(self) -> Dataset:
        records = load_metamathqa(
            self.data_dir,
            self.train_file,
            self.hub_id,
            self.split,
            self.cache_dir,
            bad_records=self.bad_records,
            report=self.bad_record_report,
        )
        return _head(records, self.subset_size)

    def _load_eval_records(self) -> Dataset:
        parts = []
        for name in self.eval_datasets:
            if name == "gsm8k":
                records = load_gsm8k("test", self.gsm8k_dir, hub_id=self.gsm8k_hub_id, cache_dir=self.cache_dir)
            else:
                records = load_math("test", self.math_dir, test_hub_id=self.math_test_hub_id, cache_dir=self.cache_dir)
            parts.append(_head(records, self.max_eval_examples))
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    def make_metric(self) -> TaskAccuracy:
        """``GSM8KAccuracy``, ``MATHAccuracy``, or a two-task ``TaskAccuracy`` for both."""
        if list(self.eval_datasets) == ["gsm8k"]:
            return GSM8KAccuracy()
        if list(self.eval_datasets) == ["math"]:
            return MATHAccuracy()
        return TaskAccuracy(list(self.eval_datasets))
