"""Commonsense reasoning: train on Commonsense170K, evaluate on the eight tasks of LLM-Adapters' suite.

Every file is a JSON list of ``{"instruction", "input", "output", "answer"}`` records: ``instruction``
holds the question, the choices and the answer format; ``output`` is "the correct answer is X" (the
training target); ``answer`` is X, one word of the task's vocabulary (``true``/``false``,
``solution1/2``, ``answer1..5``, ``option1/2``, ``ending1..4``). Commonsense170K
(``commonsense_170k.json``) is the union of the eight tasks' training splits in this format.

Local layout (LLM-Adapters' ``dataset/`` folder)::

    data_dir/commonsense_170k.json          training (or pass train_files=[...], e.g. "boolq/train.json")
    data_dir/<task>/test.json               evaluation, one folder per task

Evaluation batches carry the task name of every example, and :class:`~lit_svd.eval.metrics.ChoiceAccuracy`
reports accuracy per task and their average.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, concatenate_datasets

from lit_svd.data.base import (
    BadRecords,
    InstructionDataModule,
    RecordProblems,
    load_hub_split,
    load_json_records,
    resolve_file,
)
from lit_svd.eval.answers import CHOICE_VOCABULARY, COMMONSENSE_TASKS
from lit_svd.eval.metrics import ChoiceAccuracy

__all__ = [
    "COMMONSENSE_170K_HUB_ID",
    "COMMONSENSE_COLUMNS",
    "CommonsenseDataModule",
    "check_commonsense_tasks",
    "load_commonsense_file",
]

COMMONSENSE_170K_HUB_ID = "zwhe99/commonsense_170k"
"""A Hub mirror of LLM-Adapters' ``commonsense_170k.json`` (same schema); override with ``train_hub_id``."""

COMMONSENSE_COLUMNS = ("instruction", "output", "answer")
"""Required columns (``input`` is optional and empty in every file of the suite)."""


def check_commonsense_tasks(tasks: list[str]) -> None:
    """Raise a ``ValueError`` naming any unknown task and listing the valid ones."""
    unknown = [task for task in tasks if task not in COMMONSENSE_TASKS]
    if unknown:
        raise ValueError(
            f"unknown commonsense task(s) {', '.join(repr(task) for task in unknown)}; "
            f"choose from: {', '.join(COMMONSENSE_TASKS)}"
        )
    if not tasks:
        raise ValueError(f"tasks must name at least one of: {', '.join(COMMONSENSE_TASKS)}")


def _commonsense_records(batch: dict[str, list], task: str, source: str) -> dict[str, list]:
    answers = [str(answer).strip() for answer in batch["answer"]]
    if task:
        vocabulary = CHOICE_VOCABULARY[task]
        for answer in answers:
            if answer.lower() not in vocabulary:
                raise ValueError(
                    f"{source}: answer {answer!r} is not a {task} answer ({'/'.join(vocabulary)}); "
                    "is this the right task's file?"
                )
    count = len(answers)
    inputs = batch.get("input") or [""] * count
    return {
        "query": batch["instruction"],
        "input": [text or "" for text in inputs],
        "response": batch["output"],
        "reference": answers,
        "task": [task] * count,
    }


def _to_records(raw: Dataset, task: str, source: str) -> Dataset:
    return raw.map(
        _commonsense_records,
        batched=True,
        remove_columns=raw.column_names,
        fn_kwargs={"task": task, "source": source},
        desc=f"{task or 'commonsense'} records",
    )


def load_commonsense_file(
    path: str | Path,
    task: str = "",
    cache_dir: str | None = None,
    bad_records: BadRecords = "error",
    report: list[RecordProblems] | None = None,
) -> Dataset:
    """One commonsense JSON file as canonical records.

    Args:
        path: a JSON list in the ``{instruction, input, output, answer}`` schema.
        task: the task the records belong to (checks every ``answer`` against its vocabulary); ``""`` for
            mixed files such as Commonsense170K.
        cache_dir: ``datasets`` cache folder.
        bad_records: ``"error"`` or ``"skip"`` for bad records (see :func:`~lit_svd.data.base.load_json_records`).
        report: collects the file's bad records.

    Returns:
        Records with ``reference`` = the ``answer`` word and ``task`` = ``task``.
    """
    if task:
        check_commonsense_tasks([task])
    raw = load_json_records(
        path, COMMONSENSE_COLUMNS, cache_dir, bad_records=bad_records, report=report, may_be_empty=("input",)
    )
    return _to_records(raw, task, str(path))


class CommonsenseDataModule(InstructionDataModule):
    """Commonsense170K training and per-task generation evaluation (the LLM-Adapters / DoRA / PiSSA setup).

    Example::

        dm = CommonsenseDataModule(data_dir="data/commonsense",
                                   train_files=["boolq/train.json", "ARC-Easy/train.json"],
                                   tasks=["boolq", "piqa", "ARC-Easy"], max_eval_examples=100)

    Args:
        tasks: tasks to evaluate on (default: all eight, :data:`~lit_svd.eval.answers.COMMONSENSE_TASKS`);
            their test sets are read from ``data_dir/<task>/<test_file>``.
        train_files: training files, relative to ``data_dir`` or absolute; a file inside a folder named
            after a task (``boolq/train.json``) is checked against that task's answers. Default:
            ``commonsense_170k.json`` in ``data_dir``, or the Hub (``train_hub_id``) when ``data_dir`` is
            ``None``.
        train_hub_id: Hub id of Commonsense170K, used when neither ``data_dir`` nor ``train_files`` is given.
        test_file: file name of each task's test set.
        **kwargs: the :class:`~lit_svd.data.base.InstructionDataModule` arguments (``max_eval_examples``
            applies per task).
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        train_files: list[str] | None = None,
        train_hub_id: str = COMMONSENSE_170K_HUB_ID,
        test_file: str = "test.json",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.tasks = list(tasks) if tasks is not None else list(COMMONSENSE_TASKS)
        check_commonsense_tasks(self.tasks)
        self.train_files = list(train_files) if train_files is not None else None
        self.train_hub_id = train_hub_id
        self.test_file = test_file

    def _load_train_records(self) -> Dataset:
        if self.train_files is None and self.data_dir is None:
            hint = "pass data_dir='path/to/commonsense' holding commonsense_170k.json, or train_files=[...]"
            raw = load_hub_split(
                self.train_hub_id, None, "train", COMMONSENSE_COLUMNS, self.cache_dir, hint, self.bad_records,
                report=self.bad_record_report, may_be_empty=("input",),
            )  # fmt: skip
            return _to_records(raw, "", self.train_hub_id)
        files = self.train_files if self.train_files is not None else ["commonsense_170k.json"]
        parts = []
        for file in files:
            path = resolve_file(self.data_dir, file)
            task = path.parent.name if path.parent.name in COMMONSENSE_TASKS else ""
            parts.append(load_commonsense_file(path, task, self.cache_dir, self.bad_records, self.bad_record_report))
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    def _load_eval_records(self) -> Dataset:
        if self.data_dir is None:
            raise ValueError(
                "the commonsense test sets have no canonical Hub id: pass data_dir='path/to/commonsense' "
                f"holding <task>/{self.test_file} for tasks {', '.join(self.tasks)} "
                "(LLM-Adapters' dataset/ folder)"
            )
        parts = []
        for task in self.tasks:
            path = Path(self.data_dir) / task / self.test_file
            records = load_commonsense_file(path, task, self.cache_dir, self.bad_records, self.bad_record_report)
            if self.max_eval_examples is not None and self.max_eval_examples < len(records):
                records = records.select(range(self.max_eval_examples))
            parts.append(records)
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)

    def make_metric(self) -> ChoiceAccuracy:
        """A fresh :class:`~lit_svd.eval.metrics.ChoiceAccuracy` over ``tasks``."""
        return ChoiceAccuracy(self.tasks)
