"""Generation-accuracy metrics as torchmetrics ``Metric``s.

Each metric keeps two integer state vectors, ``correct`` and ``total`` of shape ``(num_tasks,)``, declared
with ``dist_reduce_fx="sum"`` so that ``compute()`` under DDP counts every rank's examples exactly once.
Judging a generation is delegated to :func:`lit_svd.eval.answers.is_correct`.

Usage inside a ``LightningModule`` (the datamodule builds the right metric)::

    self.val_accuracy = datamodule.make_metric()            # e.g. GSM8KAccuracy()
    ...
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    self.val_accuracy.update(texts, batch["references"], batch["task"])
    ...
    value = self.val_accuracy.compute()   # a scalar tensor, or a dict {task: acc, "average": acc}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lit_svd.eval.answers import COMMONSENSE_TASKS, is_correct

__all__ = ["ChoiceAccuracy", "GSM8KAccuracy", "MATHAccuracy", "TaskAccuracy"]


class TaskAccuracy(Metric):
    """Exact-answer accuracy of generations, counted per task.

    Args:
        tasks: the task names this metric accepts (``"gsm8k"``, ``"math"`` or commonsense task names).
        **kwargs: forwarded to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    ``compute()`` returns ``{task: accuracy, ..., "average": macro average over tasks that saw examples}``;
    a task without examples reports ``nan``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, tasks: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskAccuracy needs at least one task name")
        self.tasks = tuple(tasks)
        self._task_index = {task: index for index, task in enumerate(self.tasks)}
        self.add_state("correct", default=torch.zeros(len(self.tasks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(len(self.tasks), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str], tasks: Sequence[str] | None = None) -> None:
        """Judge a batch of generations.

        Args:
            predictions: decoded generations, one per example (new tokens only).
            references: reference answers, one per example.
            tasks: task name per example; may be omitted when the metric has a single task.

        Raises:
            ValueError: on length mismatches, a missing ``tasks`` for a multi-task metric, or a task name
                the metric was not built for.
        """
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
        if tasks is None:
            if len(self.tasks) != 1:
                raise ValueError(f"this metric covers tasks {list(self.tasks)}; pass tasks= for every example")
            tasks = [self.tasks[0]] * len(predictions)
        if len(tasks) != len(predictions):
            raise ValueError(f"got {len(predictions)} predictions but {len(tasks)} task names")
        correct = torch.zeros(len(self.tasks), dtype=torch.long)
        total = torch.zeros(len(self.tasks), dtype=torch.long)
        for prediction, reference, task in zip(predictions, references, tasks, strict=True):
            if task not in self._task_index:
                raise ValueError(f"task {task!r} is not one of this metric's tasks: {list(self.tasks)}")
            index = self._task_index[task]
            total[index] += 1
            correct[index] += int(is_correct(prediction, reference, task))
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-task accuracy and their macro average.

        Returns:
            ``{task: accuracy (scalar float tensor), ..., "average": mean over tasks with examples}``.
        """
        accuracy = self.correct.double() / self.total.double()  # 0/0 -> nan for tasks without examples
        values = {task: accuracy[index].float() for task, index in self._task_index.items()}
        seen = self.total > 0
        values["average"] = accuracy[seen].mean().float() if bool(seen.any()) else accuracy.new_tensor(0.0).float()
        return values


class _SingleTaskAccuracy(TaskAccuracy):
    task_name: str

    def __init__(self, **kwargs) -> None:
        super().__init__((self.task_name,), **kwargs)

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        """Accuracy over all examples seen.

        Returns:
            A scalar float tensor (0 when nothing was seen).
        """
        total = self.total.sum()
        if int(total) == 0:
            return torch.tensor(0.0, device=self.total.device)
        return self.correct.sum().float() / total.float()


class GSM8KAccuracy(_SingleTaskAccuracy):
    """GSM8K accuracy: numeric match of "The answer is X" / the last number against the reference.

    ``update(predictions, references)`` takes generations and reference numbers (or full solutions with
    ``####``); ``compute()`` returns a scalar tensor.
    """

    task_name = "gsm8k"


class MATHAccuracy(_SingleTaskAccuracy):
    """MATH accuracy: normalised exact match of the last ``\\boxed{}`` against the reference answer.

    ``update(predictions, references)`` takes generations and reference answer strings; ``compute()``
    returns a scalar tensor.
    """

    task_name = "math"


class ChoiceAccuracy(TaskAccuracy):
    """Commonsense multiple-choice accuracy, per task and averaged.

    Args:
        tasks: commonsense task names to track (default: all eight).
        **kwargs: forwarded to ``torchmetrics.Metric``.

    ``update(predictions, references, tasks)`` needs the task name of every example (eval batches carry it
    under ``"task"``); ``compute()`` returns ``{task: accuracy, ..., "average": macro average}``.
    """

    def __init__(self, tasks: Sequence[str] = COMMONSENSE_TASKS, **kwargs) -> None:
        unknown = [task for task in tasks if task not in COMMONSENSE_TASKS]
        if unknown:
            raise ValueError(f"unknown commonsense task(s) {unknown}; choose from: {', '.join(COMMONSENSE_TASKS)}")
        super().__init__(tasks, **kwargs)
