"""The instruction-tuning data pipeline shared by every datamodule.

    raw records (Hub or local JSON)          e.g. {"question", "answer"}
        │  schema check, per-dataset conversion (cached datasets.map)
        ▼
    canonical records                        {"query", "input", "response", "reference", "task"}
        │  prompt template + tokenizer (cached datasets.map, explicit fingerprint)
        ▼
    tokenised records                        {"input_ids", "prompt_length", "length", "reference", "task"}
        │  over-length policy (train only): truncate the response end, or drop
        ▼
    InstructionCollator                      dynamic padding per batch
        train batch: input_ids, attention_mask (B, T) right-padded; labels (B, T) = -100 on prompt + padding
        eval batch:  the above + prompt_input_ids, prompt_attention_mask (B, P) left-padded for generation,
                     references: list[str], task: list[str]

``input_ids`` = tokens(prompt) + tokens(separator + response) + [eos]. Prompt and response are tokenised
separately, so ``prompt_length`` is the exact number of loss-free tokens; the collator turns it into the
label mask. Concrete datamodules only say where their records come from (``_load_train_records`` /
``_load_eval_records``) and which metric judges them (``make_metric``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from datasets import Dataset, ReadInstruction, load_dataset
from datasets.fingerprint import Hasher
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric

from lit_svd.attention import sequence_boundaries
from lit_svd.data.prompts import build_prompt, response_separator, validate_template
from lit_svd.losses import IGNORE_INDEX

__all__ = [
    "CANONICAL_COLUMNS",
    "DataSourceError",
    "InstructionCollator",
    "InstructionDataModule",
    "LengthGroupedSampler",
    "RecordProblems",
    "ResumableDataLoader",
    "TokenBudgetSampler",
    "check_columns",
    "check_records",
    "load_hub_split",
    "load_json_records",
    "pack_padded_batch",
    "packed_row_length",
    "scan_json_lines",
    "tokenize_instructions",
]

CANONICAL_COLUMNS: tuple[str, ...] = ("query", "input", "response", "reference", "task")
"""Columns every datamodule converts its raw records to before tokenisation."""


class DataSourceError(OSError):
    """A dataset could not be loaded from the Hugging Face Hub (offline, unreachable, or unknown id)."""


# --------------------------------------------------------------------------------------------- loading


def check_columns(dataset: Dataset, required: Sequence[str], source: str) -> None:
    """Raise a ``ValueError`` naming the missing column(s) and the source when the schema does not fit.

    Args:
        dataset: the loaded records.
        required: column names the conversion needs.
        source: the file path or Hub id, for the message.
    """
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(repr(column) for column in missing)}; expected "
            f"{', '.join(required)}, found {', '.join(dataset.column_names) or 'no columns'}"
        )


BadRecords = Literal["error", "skip"]
"""What a data file's bad records do: ``"error"`` stops with the file and line, ``"skip"`` leaves them out."""


@dataclass
class RecordProblems:
    """The bad records of one data file: reason → 1-based line numbers (record numbers in a JSON array)."""

    source: str
    lines: dict[str, list[int]] = field(default_factory=dict)
    unit: str = "line"

    def add(self, reason: str, line: int) -> None:
        self.lines.setdefault(reason, []).append(line)

    @property
    def total(self) -> int:
        return sum(len(lines) for lines in self.lines.values())

    def counts(self) -> dict[str, int]:
        return {reason: len(lines) for reason, lines in self.lines.items()}

    def summary(self) -> str:
        """E.g. ``train.jsonl: 3 bad records: not valid JSON: 1 (line 4); missing field 'answer': 2 (lines 7, 9)``."""
        parts = []
        for reason, lines in self.lines.items():
            shown = ", ".join(map(str, lines[:5])) + (" …" if len(lines) > 5 else "")
            parts.append(f"{reason}: {len(lines)} ({self.unit}{'s' if len(lines) > 1 else ''} {shown})")
        return f"{self.source}: {self.total} bad record{'s' if self.total != 1 else ''}: " + "; ".join(parts)


def _record_reason(
    record: Any, required: Sequence[str], check: Callable[[dict], str | None] | None, may_be_empty: Sequence[str] = ()
) -> str | None:
    """Why a parsed record is bad (``None``: it is good)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in required:
        value = record.get(name)
        if value is None:
            return f"missing field {name!r}"
        if not isinstance(value, str):
            return f"field {name!r} is not text"
        if not value.strip() and name not in may_be_empty:
            return f"empty field {name!r}"
    return check(record) if check is not None else None


def scan_json_lines(
    path: str | os.PathLike,
    required: Sequence[str],
    check: Callable[[dict], str | None] | None = None,
    may_be_empty: Sequence[str] = (),
) -> tuple[list[dict], RecordProblems]:
    """Read a JSON Lines file line by line: the good records, and the bad ones by reason and line.

    A record is bad when its line is not UTF-8, not valid JSON or not a JSON object, when a ``required``
    field is missing, not a string or empty (unless listed in ``may_be_empty``), or when ``check(record)``
    returns a reason. Blank lines are ignored.
    """
    problems = RecordProblems(str(path))
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.add("not UTF-8", number)
                continue
            except json.JSONDecodeError:
                problems.add("not valid JSON", number)
                continue
            reason = _record_reason(record, required, check, may_be_empty)
            if reason is not None:
                problems.add(reason, number)
                continue
            records.append(record)
    return records, problems


def _looks_clean(
    dataset: Dataset, required: Sequence[str], check: Callable[[dict], str | None] | None, may_be_empty: Sequence[str]
) -> bool:
    """Whether no record has a problem (``_record_reason``): then no line-by-line scan is needed. Reads the
    required columns only."""
    columns = [dataset[name] for name in required]
    return all(
        _record_reason(dict(zip(required, values, strict=True)), required, check, may_be_empty) is None
        for values in zip(*columns, strict=True)
    )


def load_json_records(
    path: str | os.PathLike,
    required: Sequence[str],
    cache_dir: str | None = None,
    split: str = "train",
    bad_records: BadRecords = "error",
    check: Callable[[dict], str | None] | None = None,
    report: list[RecordProblems] | None = None,
    may_be_empty: Sequence[str] = (),
) -> Dataset:
    """Load a JSON (list of objects) or JSON Lines file through ``datasets`` and check its columns and records.

    A clean file takes the ``datasets`` path (Arrow, cached). When a JSON Lines file has bad records (see
    :func:`scan_json_lines`) they are never dropped silently: ``bad_records="error"`` raises naming the file,
    the first bad line and the counts per reason; ``"skip"`` warns with the same counts and loads the rest.

    Args:
        path: the file.
        required: columns that must be present, each a non-empty string in every record.
        cache_dir: ``datasets`` cache folder (default: the user's HF cache).
        split: a ``datasets`` split expression over the file's single split, e.g. ``"train[:1000]"``.
        bad_records: ``"error"`` or ``"skip"``.
        check: a dataset's own record check (e.g. GSM8K's ``#### N`` answer line): a reason, or ``None``.
        report: a list to which the file's :class:`RecordProblems` are appended (when it has any).
        may_be_empty: required fields that may hold an empty string (e.g. an optional ``input``).

    Returns:
        The records as a ``Dataset``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when a required column is missing, or (``"error"``) a record is bad.
    """
    if bad_records not in ("error", "skip"):
        raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        dataset = load_dataset("json", data_files=str(path), split=split, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - Arrow's JSON reader raises several kinds on a bad line
        dataset, failure = None, error
    if dataset is not None:
        check_columns(dataset, required, str(path))
        if _looks_clean(dataset, required, check, may_be_empty):
            return dataset
    with open(path, "rb") as f:
        json_lines = f.read(4096).lstrip()[:1] != b"["
    if not json_lines:  # a JSON array has no lines to name: its records are numbered
        if dataset is None:
            raise ValueError(f"{path}: not a readable JSON file ({str(failure).splitlines()[0][:200]})") from failure
        return check_records(
            dataset, str(path), required, bad_records, check, report, may_be_empty, clean=False
        )  # already the requested split
    records, problems = scan_json_lines(path, required, check, may_be_empty)
    _act_on_bad_records(problems, bad_records, report, "Fix the file, or pass")
    dataset = Dataset.from_list(records)
    check_columns(dataset, required, str(path))
    (instruction,) = ReadInstruction.from_spec(split).to_absolute({"train": len(dataset)})
    return dataset.select(range(instruction.from_, instruction.to))


def _act_on_bad_records(
    problems: RecordProblems, bad_records: BadRecords, report: list[RecordProblems] | None, fix: str
) -> None:
    """Report ``problems`` once per source; raise (``"error"``) or warn (``"skip"``) when there are any."""
    if not problems.total:
        return
    if report is not None and all(p.source != problems.source for p in report):
        report.append(problems)  # once per source, also when prepare_data and setup both read it
    if bad_records == "error":
        first = min(lines[0] for lines in problems.lines.values())
        raise ValueError(
            f"{problems.summary()}. First at {problems.unit} {first}. {fix} bad_records='skip' "
            "(--data.bad_records skip) to train without them"
        )
    rank_zero_warn(f"skipping {problems.summary()}")


def check_records(
    dataset: Dataset,
    source: str,
    required: Sequence[str],
    bad_records: BadRecords = "error",
    check: Callable[[dict], str | None] | None = None,
    report: list[RecordProblems] | None = None,
    may_be_empty: Sequence[str] = (),
    clean: bool | None = None,
) -> Dataset:
    """Check a loaded dataset (a JSON array's records, a Hub split) record by record, as a file's lines are.

    Records are numbered from 1 in ``dataset``'s order. Bad ones (see :func:`scan_json_lines`) are never
    dropped silently: ``bad_records="error"`` raises naming ``source``, the first bad record and the counts
    per reason; ``"skip"`` warns with the same counts and returns the rest (and ``report`` collects them).

    Args:
        clean: whether the caller already knows that no record is bad (``None``: find out, reading the
            ``required`` columns only).
    """
    if bad_records not in ("error", "skip"):
        raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
    if clean is None:
        clean = _looks_clean(dataset, required, check, may_be_empty)
    if clean:
        return dataset
    problems, keep = RecordProblems(source, unit="record"), []
    for index, record in enumerate(dataset):
        reason = _record_reason(record, required, check, may_be_empty)
        if reason is None:
            keep.append(index)
        else:
            problems.add(reason, index + 1)
    _act_on_bad_records(problems, bad_records, report, "Fix the file, or pass" if Path(source).is_file() else "Pass")
    return dataset.select(keep)


def load_hub_split(
    hub_id: str,
    config: str | None,
    split: str,
    required: Sequence[str],
    cache_dir: str | None = None,
    local_hint: str = "",
    bad_records: BadRecords = "error",
    check: Callable[[dict], str | None] | None = None,
    report: list[RecordProblems] | None = None,
    may_be_empty: Sequence[str] = (),
) -> Dataset:
    """Load one split of a Hub dataset, turning connection failures into an actionable error, and check its
    records one by one (:func:`check_records`) as a local file's are.

    Args:
        hub_id: e.g. ``"openai/gsm8k"``.
        config: the dataset configuration (``"main"``), or ``None``.
        split: a ``datasets`` split expression.
        required: columns that must be present.
        cache_dir: ``datasets`` cache folder.
        local_hint: how to pass local files instead, appended to the error message.
        bad_records, check, report, may_be_empty: as for :func:`load_json_records`.

    Returns:
        The split as a ``Dataset`` (without its bad records under ``bad_records="skip"``).

    Raises:
        DataSourceError: when the Hub (or its cached copy) cannot be reached; names the id and the fix.
        ValueError: when a required column is missing, or (``"error"``) a record is bad.
    """
    described = f"'{hub_id}'" + (f" (config '{config}')" if config else "") + f", split '{split}'"
    try:
        dataset = load_dataset(hub_id, config, split=split, cache_dir=cache_dir)
    except OSError as error:  # ConnectionError (offline / unreachable) and DatasetNotFoundError
        raise DataSourceError(
            f"could not load {described} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"Without network access, or with HF_DATASETS_OFFLINE=1 and no cached copy, use local files: "
            f"{local_hint}"
        ) from error
    check_columns(dataset, required, f"Hub dataset {described}")
    return check_records(dataset, f"Hub dataset {described}", required, bad_records, check, report, may_be_empty)


def resolve_file(data_dir: str | os.PathLike | None, file: str | os.PathLike) -> Path:
    """``file`` if it is absolute, else ``data_dir / file``."""
    file = Path(file)
    if file.is_absolute() or data_dir is None:
        return file
    return Path(data_dir) / file


# ---------------------------------------------------------------------------------------- tokenisation


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what the tokenizer does, for the ``datasets`` map cache.

    Hashing the tokenizer object with ``dill`` is slow and not stable across processes; its serialised
    vocabulary/merges (fast tokenizers), special tokens and chat template identify it instead.
    """
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(hashlib.sha256(backend.to_str().encode()).hexdigest())
    else:
        parts.append(hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest())
    parts += [
        repr(tokenizer.all_special_tokens),
        str(getattr(tokenizer, "chat_template", None)),
        str(tokenizer.eos_token_id),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, template: str, separator: str) -> dict[str, list]:
    prompts = [
        build_prompt(query, input_text or "", template, tokenizer)
        for query, input_text in zip(batch["query"], batch["input"], strict=True)
    ]
    # Chat templates already contain their special tokens; text templates get the tokenizer's BOS (if any).
    prompt_ids = tokenizer(prompts, add_special_tokens=template != "chat")["input_ids"]
    responses = [separator + response.strip() for response in batch["response"]]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    input_ids = [prompt + response + eos for prompt, response in zip(prompt_ids, response_ids, strict=True)]
    return {
        "input_ids": input_ids,
        "prompt_length": [len(prompt) for prompt in prompt_ids],
        "length": [len(ids) for ids in input_ids],
    }


def tokenize_instructions(
    records: Dataset, tokenizer: Any, template: str = "alpaca", num_proc: int | None = None
) -> Dataset:
    """Tokenise canonical records into ``input_ids`` / ``prompt_length`` / ``length`` (+ reference, task).

    The result is cached by ``datasets`` under a fingerprint of (records, tokenizer, template), so a second
    run with the same inputs reads it from disk instead of tokenising again.

    Args:
        records: a ``Dataset`` with :data:`CANONICAL_COLUMNS`.
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        template: prompt template (see ``lit_svd.data.prompts``).
        num_proc: processes for ``datasets.map`` (``None``: in-process; fast tokenizers batch anyway).

    Returns:
        A ``Dataset`` with columns ``input_ids`` (list[int], untruncated), ``prompt_length`` (int),
        ``length`` (int), ``reference`` (str) and ``task`` (str).
    """
    check_columns(records, CANONICAL_COLUMNS, "canonical records")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS for generation to stop")
    separator = response_separator(template, tokenizer)
    fingerprint = Hasher.hash(
        ["lit_svd.tokenize_instructions/v1", records._fingerprint, tokenizer_fingerprint(tokenizer), template]
    )
    return records.map(
        _tokenize_batch,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        remove_columns=["query", "input", "response"],
        fn_kwargs={"tokenizer": tokenizer, "template": template, "separator": separator},
        new_fingerprint=fingerprint,
        desc="Tokenising",
    )


# ------------------------------------------------------------------------------------- batching


def _to_tensor(rows: list[list[int]], pad_value: int, width: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for row_index, row in enumerate(rows):
        if not row:
            continue
        values = torch.tensor(row, dtype=torch.long)
        if left:
            out[row_index, width - len(row) :] = values
        else:
            out[row_index, : len(row)] = values
    return out


def non_padding_tokens(batch: dict[str, Any]) -> torch.Tensor | int:
    """Tokens of a training batch that are not padding: a device tensor for padded batches (summed without a
    host sync), an int for packed ones (the row minus its padding sequence)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    return batch["input_ids"].numel() - int(batch.get("padding_tokens", 0))


def pack_padded_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A padded batch as one packed row (the format of ``lit_svd.attention``), its padding dropped.

    The same sequences and the same loss targets in fewer FLOPs: each sequence's first label becomes −100
    (in the padded batch nothing predicts it either; packed, the previous sequence's last token would) and
    positions restart at 0 for every sequence. Rows without a single token are dropped.

    Args:
        batch: ``input_ids`` (B, T); optional ``attention_mask`` (B, T) (default: no padding) and ``labels``
            (B, T) (default: the input ids, padding never a target). Other keys are not carried over.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (1, N) with N the batch's real tokens, ``cu_seq_lens``
        (S+1,) int32 on the batch's device, and ``max_length`` (the longest sequence) and ``padding_tokens`` (0)
        as ints; the rows' real tokens in row-major order (``input_ids[attention_mask.bool()]``).
    """
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"pack_padded_batch needs input_ids of shape (batch, sequence), got {tuple(input_ids.shape)}")
    mask = batch.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    labels = input_ids.masked_fill(~real, IGNORE_INDEX) if labels is None else labels
    lengths = real.sum(-1)
    lengths = lengths[lengths > 0]
    if lengths.numel() == 0:
        raise ValueError("pack_padded_batch got a batch without a single real token (every position is padding)")
    boundaries = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    boundaries[1:] = lengths.cumsum(0)
    positions = real.long().cumsum(-1) - 1
    packed_labels = labels[real]
    packed_labels[boundaries[:-1].long()] = IGNORE_INDEX
    return {
        "input_ids": input_ids[real][None],
        "labels": packed_labels[None],
        "position_ids": positions[real][None],
        "cu_seq_lens": boundaries,
        "max_length": int(lengths.max()),
        "padding_tokens": 0,
    }


def packed_row_length(tokens: int, multiple: int | None) -> int:
    """The length of the packed row of ``tokens`` tokens: ``tokens`` itself, or with ``multiple``
    (``InstructionCollator.pack_to_multiple_of``) the next multiple above it — always at least one token more,
    the padding sequence: ``(tokens // multiple + 1) * multiple``."""
    return tokens if multiple is None else (tokens // multiple + 1) * multiple


@dataclass
class InstructionCollator:
    """Dynamic padding of tokenised records into a batch.

    Args:
        pad_token_id: id used for padding (the tokenizer's pad token, else its EOS).
        max_length: training sequences are cut to this many tokens (the response end is lost); ``None``
            keeps them whole.
        generation_inputs: also emit left-padded prompts and the references (for evaluation batches).
        pack: concatenate the batch into one padding-free row (training only; see ``lit_svd.attention``).
        pack_to_multiple_of: with ``pack``, extend the row to the next multiple of this many tokens (always
            by at least one token) with a padding sequence of its own — no label, attended only by itself.
            Rows then come in a few fixed lengths with one more entry in ``cu_seq_lens``, and ``max_length``
            is the constant ``max(max_length, pack_to_multiple_of)``: what CUDA graphs (which replay fixed
            shapes) need. ``None``: rows of exactly the batch's token count.

    Returns (from ``__call__``):
        ``input_ids`` (B, T) long, right-padded; ``attention_mask`` (B, T) long; ``labels`` (B, T) long,
        ``-100`` on prompt and padding. With ``generation_inputs``: ``prompt_input_ids`` and
        ``prompt_attention_mask`` (B, P), left-padded so generation continues every row at the same
        position; ``references`` list[str] of length B; ``task`` list[str] of length B.
        With ``pack``: ``input_ids``, ``labels`` and ``position_ids`` (1, N), N = total tokens, positions
        restarting at 0 per sequence and each sequence's first label −100 (nothing predicts across a
        boundary); ``cu_seq_lens`` (B+1,) int32 cumulative lengths (B+2 with ``pack_to_multiple_of``);
        ``max_length`` int, the longest length (an upper bound of it with ``pack_to_multiple_of``);
        ``padding_tokens`` int, the length of the padding sequence (0 without ``pack_to_multiple_of``);
        ``scored_positions`` (K,) long, the positions whose next token is labelled (the loss selects them
        by index, see ``lit_svd.losses.causal_lm_loss``).
    """

    pad_token_id: int
    max_length: int | None = None
    generation_inputs: bool = False
    pack: bool = False
    pack_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pack and self.generation_inputs:
            raise ValueError("pack=True is for training batches; generation needs padded prompts")
        if self.pack_to_multiple_of is not None:
            if not self.pack:
                raise ValueError("pack_to_multiple_of needs pack=True (it sizes the packed row)")
            if not isinstance(self.pack_to_multiple_of, int) or self.pack_to_multiple_of < 1:
                raise ValueError(f"pack_to_multiple_of must be a positive integer, got {self.pack_to_multiple_of!r}")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [list(example["input_ids"][: self.max_length]) for example in examples]
        if self.pack:
            return self._packed(sequences, examples)
        width = max(len(sequence) for sequence in sequences)
        input_ids = _to_tensor(sequences, self.pad_token_id, width, left=False)
        attention_mask = _to_tensor([[1] * len(sequence) for sequence in sequences], 0, width, left=False)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (sequence, example) in enumerate(zip(sequences, examples, strict=True)):
            start = min(int(example["prompt_length"]), len(sequence))
            labels[row, start : len(sequence)] = input_ids[row, start : len(sequence)]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.generation_inputs:
            # The prompt is never truncated: a question cut short cannot be answered.
            prompts = [list(example["input_ids"][: example["prompt_length"]]) for example in examples]
            prompt_width = max(len(prompt) for prompt in prompts)
            batch["prompt_input_ids"] = _to_tensor(prompts, self.pad_token_id, prompt_width, left=True)
            batch["prompt_attention_mask"] = _to_tensor(
                [[1] * len(prompt) for prompt in prompts], 0, prompt_width, left=True
            )
            batch["references"] = [example["reference"] for example in examples]
            batch["task"] = [example["task"] for example in examples]
        return batch

    def _packed(self, sequences: list[list[int]], examples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(sequence) for sequence in sequences]
        tokens = [token for sequence in sequences for token in sequence]
        longest, padding = max(lengths), 0
        if self.pack_to_multiple_of is not None:
            multiple = self.pack_to_multiple_of
            # 1 … multiple: the row always has the padding sequence
            padding = packed_row_length(len(tokens), multiple) - len(tokens)
            tokens += [self.pad_token_id] * padding
            lengths = [*lengths, padding]
            longest = max(longest, self.max_length or 0, multiple)
        boundaries = sequence_boundaries(lengths)
        input_ids = torch.tensor(tokens, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        real = len(examples)  # the padding sequence, if any, comes last and gets no label
        for start, length, example in zip(boundaries[:real].tolist(), lengths[:real], examples, strict=True):
            # max(…, 1): the first token has no predecessor in its own sequence.
            first_scored = max(min(int(example["prompt_length"]), length), 1)
            labels[start + first_scored : start + length] = input_ids[start + first_scored : start + length]
        position_ids = torch.cat([torch.arange(length) for length in lengths])
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "scored_positions": torch.nonzero(labels[1:] != IGNORE_INDEX).squeeze(1),
            "position_ids": position_ids[None],
            "cu_seq_lens": boundaries,
            "max_length": longest,
            "padding_tokens": padding,
        }


class LengthGroupedSampler(DistributedSampler):
    """Random order, but examples of similar length end up in the same batch (less padding).

    Indices are shuffled (seeded, reshuffled by ``set_epoch``), cut into mega-batches of
    ``batch_size * num_replicas * mega_batch_factor`` and each mega-batch is sorted by length, longest first.
    Under DDP each rank takes every ``num_replicas``-th index, so one step's batches across ranks come from
    the same sorted stretch. It subclasses ``DistributedSampler`` so Lightning does not wrap it again (which
    would reshuffle the indices and undo the grouping).

    Args:
        lengths: token count per example (after truncation).
        batch_size: per-device batch size.
        num_replicas: world size (default: from ``torch.distributed`` if initialised, else 1).
        rank: this process's rank (default: from ``torch.distributed`` if initialised, else 0).
        seed: shuffling seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the tail so every rank gets the same count (else it is padded by repetition).
        mega_batch_factor: batches per rank per sorted mega-batch (50 as in HF ``Trainer``).
        group_by_length: ``False``: a plain seeded shuffle (no sorting), with the same resumability.

    A run resumed in the middle of an epoch continues with that epoch's remaining indices
    (:meth:`resume_at`, set from a checkpoint by :class:`ResumableDataLoader`); ``len`` stays the whole
    epoch's, so that Lightning's batch count of the epoch, which continues from the checkpoint, ends where
    the uninterrupted run's does.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        mega_batch_factor: int = 50,
        group_by_length: bool = True,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.lengths = np.asarray(lengths, dtype=np.int64)
        super().__init__(
            self.lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        self.batch_size = batch_size
        self.mega_batch_size = batch_size * num_replicas * mega_batch_factor
        self.group_by_length = group_by_length
        self._resume: tuple[int, int] | None = None  # (epoch, indices of this rank already consumed in it)

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Start epoch ``epoch`` after this rank's first ``consumed`` items (a mid-epoch resume): indices here,
        whole batches for :class:`TokenBudgetSampler`."""
        if epoch < 0 or consumed < 0:
            raise ValueError(f"resume position must be non-negative, got epoch {epoch}, consumed {consumed}")
        self._resume = (epoch, consumed)

    def _epoch_order(self) -> np.ndarray:
        """Every example index once, in this epoch's order across all ranks: a seeded shuffle, each mega-batch
        sorted longest first (``group_by_length``)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        # device="cpu": the generator's; inside a default-device context (Lightning's configure_model runs in
        # torch.device("cuda")) randperm would otherwise pair a CPU generator with a CUDA tensor and fail.
        order = torch.randperm(len(self.lengths), generator=generator, device="cpu").numpy()
        mega_batches = [
            order[start : start + self.mega_batch_size] for start in range(0, len(order), self.mega_batch_size)
        ]
        if mega_batches and self.group_by_length:
            return np.concatenate([mega[np.argsort(-self.lengths[mega], kind="stable")] for mega in mega_batches])
        return order

    def __iter__(self) -> Iterator[int]:
        arranged = self._epoch_order()
        if self.drop_last:
            arranged = arranged[: self.total_size]
        elif len(arranged) < self.total_size:
            repeats = -(-(self.total_size - len(arranged)) // max(len(arranged), 1))
            arranged = np.concatenate([arranged, np.tile(arranged, repeats)])[: self.total_size]
        mine = arranged[self.rank : self.total_size : self.num_replicas].tolist()
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] :]
        return iter(mine)


class TokenBudgetSampler(LengthGroupedSampler):
    """Batches filled up to a token budget: each item is one batch, the list of its example indices.

    The batches are formed once, from :class:`LengthGroupedSampler`'s order for ``seed`` (a seeded shuffle;
    mega-batches sorted longest first with ``group_by_length``), taken across all ranks and cut into
    consecutive stretches, each closed when the next example would take its packed row past ``max_tokens``::

        order      7    2    9    4    0    5   …        max_tokens = 1024
        lengths  300  250  400  200  350  500   …
        batches  [7 2 9] (950)   [4 0] (550; + 5 would be 1050)   [5 …] …

    Every epoch serves the same batches, in another seeded order (``seed + epoch``) — as TRL packs its dataset
    once and shuffles the packed rows. So every epoch has the same number of batches, which Lightning's
    epoch and resume bookkeeping assume (a loader's length is read once), and every example appears once
    per epoch. A row is the batch's token count or, with ``pack_to_multiple_of``, that count rounded up with
    its padding sequence (:func:`packed_row_length`), so every row the collator builds is at most
    ``max_tokens`` long; every batch but the packing's last is maximal.

    DDP: every rank forms the same batches and the same epoch order, and rank ``r`` takes batches ``r, r + W,
    r + 2W, …`` (``W = num_replicas``). When the batch count is not a multiple of ``W``, the epoch goes on with
    its first batches again until it is (as ``DistributedSampler`` repeats indices with ``drop_last=False``):
    every rank then steps equally often, and those few examples are seen twice.

    Use it as ``DataLoader(dataset, batch_size=None, sampler=sampler)`` with a dataset whose item for a list of
    indices is the list of those examples (as :class:`InstructionCollator` takes them). ``len`` is this rank's
    batch count per epoch. A mid-epoch resume (:meth:`resume_at`) skips whole batches; ``len`` stays the whole
    epoch's, as for the parent class.

    Args:
        lengths: token count per example (after truncation to the collator's ``max_length``).
        max_tokens: the most tokens a batch's packed row may have, its padding sequence included.
        pack_to_multiple_of: the collator's ``pack_to_multiple_of`` (``None``: rows are not rounded up).
        num_replicas: as for :class:`LengthGroupedSampler`.
        rank: as for :class:`LengthGroupedSampler`.
        seed: as for :class:`LengthGroupedSampler`; it also draws each epoch's batch order (``seed + epoch``).
        mega_batch_factor: a mega-batch holds this many typical batches per rank (``max_tokens`` / mean length
            examples each).
        group_by_length: as for :class:`LengthGroupedSampler`.

    Raises:
        ValueError: when one example's row alone exceeds ``max_tokens`` (names the example and the lengths).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        pack_to_multiple_of: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        mega_batch_factor: int = 50,
        group_by_length: bool = True,
    ) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if pack_to_multiple_of is not None and pack_to_multiple_of < 1:
            raise ValueError(f"pack_to_multiple_of must be positive or None, got {pack_to_multiple_of}")
        if len(lengths):
            longest = int(lengths.argmax())
            row = packed_row_length(int(lengths[longest]), pack_to_multiple_of)
            if row > max_tokens:
                raise ValueError(
                    f"example {longest} has {lengths[longest]} tokens: its row alone ({row} tokens with "
                    f"pack_to_multiple_of={pack_to_multiple_of}) exceeds max_tokens={max_tokens}"
                )
        typical_batch = max(1, max_tokens // max(1, int(lengths.mean()))) if len(lengths) else 1
        super().__init__(
            lengths,
            typical_batch,
            num_replicas=num_replicas,
            rank=rank,
            seed=seed,
            mega_batch_factor=mega_batch_factor,
            group_by_length=group_by_length,
        )
        self.max_tokens = max_tokens
        self.pack_to_multiple_of = pack_to_multiple_of
        self.batches = self._pack(self._epoch_order())  # self.epoch is 0: the seed's order
        self._epoch_batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batch order)

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """``order`` cut into maximal consecutive stretches whose packed rows fit ``max_tokens``."""
        batches: list[list[int]] = []
        batch: list[int] = []
        tokens = 0
        for index, length in zip(order.tolist(), self.lengths[order].tolist(), strict=True):
            if batch and packed_row_length(tokens + length, self.pack_to_multiple_of) > self.max_tokens:
                batches.append(batch)
                batch, tokens = [], 0
            batch.append(index)
            tokens += length
        if batch:
            batches.append(batch)
        return batches

    def epoch_batches(self) -> list[list[int]]:
        """The current epoch's batches across all ranks, in order (before the DDP repetition)."""
        if self._epoch_batches is None or self._epoch_batches[0] != self.epoch:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.batches), generator=generator, device="cpu").tolist()
            self._epoch_batches = (self.epoch, [self.batches[i] for i in order])
        return self._epoch_batches[1]

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator, so the epoch's order is drawn at the first next(): on resume Lightning creates the
        # epoch's iterator before its set_epoch call.
        batches = self.epoch_batches()
        total = len(self) * self.num_replicas
        mine = [batches[position % len(batches)] for position in range(self.rank, total, self.num_replicas)]
        if self._resume is not None and self._resume[0] == self.epoch:
            mine = mine[self._resume[1] :]
        yield from mine


class _ExampleLists(torch.utils.data.Dataset):
    """``dataset`` read by lists of indices: item ``[i, j, …]`` is ``[dataset[i], dataset[j], …]``.

    With ``batch_size=None`` a ``DataLoader`` hands each sampler item (a :class:`TokenBudgetSampler` batch)
    to ``dataset[item]`` and the result, unbatched, to ``collate_fn``. A Hugging Face ``Dataset`` indexed by a
    list returns columns; its ``__getitems__`` returns the records (one Arrow read), as the collator takes them.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[dict[str, Any]]:
        read = getattr(self.dataset, "__getitems__", None)
        return read(indices) if read is not None else [self.dataset[index] for index in indices]


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` whose place in the epoch is saved in Lightning checkpoints.

    Lightning stores the ``state_dict`` of a loader that has one in every checkpoint and hands it back on
    resume; a run killed in the middle of an epoch then continues with exactly the batches the uninterrupted
    run would have seen next (same order, none repeated, none skipped), on every rank. Without it, a mid-epoch
    resume restarts the epoch's data from its first batch. With a :class:`TokenBudgetSampler` (and
    ``batch_size=None``) the resume skips the whole batches done.

    The position comes from ``position()`` — ``(epoch, batches trained in it)``, read from the trainer — not
    from this loader's own iterator, which Lightning reads one batch ahead. The state also holds what decides
    the batches (batch size, token budget, ranks, examples, seed): when one of them changed, the resumed run
    warns and starts the checkpoint's epoch from its first batch.

    Args:
        *args: ``DataLoader``'s positional arguments (the dataset, the batch size, …).
        position: returns ``(epoch, batches trained in it)``; ``None``: the start of the sampler's epoch.
        **kwargs: ``DataLoader``'s keyword arguments; ``sampler`` must be a :class:`LengthGroupedSampler`, or a
            :class:`TokenBudgetSampler` with ``batch_size=None``.
    """

    def __init__(self, *args: Any, position: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, LengthGroupedSampler):
            raise TypeError(f"ResumableDataLoader needs a LengthGroupedSampler, got {type(self.sampler).__name__}")
        whole_batches = isinstance(self.sampler, TokenBudgetSampler)
        if whole_batches and self.batch_size is not None:
            raise ValueError(f"a TokenBudgetSampler yields whole batches: pass batch_size=None, got {self.batch_size}")
        if not whole_batches and self.batch_size is None:
            raise ValueError("a LengthGroupedSampler yields single examples: pass a batch_size, got None")
        self.position = position

    def _batching(self) -> dict[str, int | None]:
        """What decides this loader's batches, besides the epoch."""
        sampler = self.sampler
        budget = isinstance(sampler, TokenBudgetSampler)
        return {
            "batch_size": self.batch_size,
            "max_tokens_per_batch": sampler.max_tokens if budget else None,
            "pack_to_multiple_of": sampler.pack_to_multiple_of if budget else None,
            "num_replicas": sampler.num_replicas,
            "examples": len(sampler.lengths),
            "seed": sampler.seed,
        }

    def state_dict(self) -> dict[str, int | None]:
        epoch, batches = self.position() if self.position is not None else (self.sampler.epoch, 0)
        return {"epoch": int(epoch), "batches": int(batches), **self._batching()}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        # A checkpoint from before the token budget has no such keys: .get gives None, as for item batches.
        now = self._batching()
        changed = [f"{key} {state.get(key)} -> {value}" for key, value in now.items() if state.get(key) != value]
        if changed:
            rank_zero_warn(
                f"the checkpoint's data order cannot be continued ({', '.join(changed)}): epoch {state['epoch']} "
                f"restarts from its first batch instead of batch {state['batches'] + 1}"
            )
            return
        # The sampler counts its items: examples, or whole batches when the loader does not batch (None).
        consumed = state["batches"] if self.batch_size is None else state["batches"] * self.batch_size
        self.sampler.resume_at(state["epoch"], consumed)


# ------------------------------------------------------------------------------------- datamodule


class InstructionDataModule(LightningDataModule):
    """Base ``LightningDataModule`` for instruction tuning with generation-based evaluation.

    Subclasses implement ``_load_train_records()`` and ``_load_eval_records()`` (returning ``Dataset``s with
    :data:`CANONICAL_COLUMNS`) and ``make_metric()``.

    Splits: ``train_dataloader`` serves the training records (minus ``val_size`` held-out ones);
    ``val_dataloader`` serves the held-out records (LM loss only, no generation inputs) when
    ``val_size > 0``, otherwise the evaluation set (test split, capped at ``max_eval_examples``) as
    generation batches; ``test_dataloader`` and ``predict_dataloader`` always serve the evaluation set.

    The tokenizer: give a Hub id / local path in ``tokenizer`` (plus ``tokenizer_gguf_file`` for a GGUF
    checkpoint), call ``set_tokenizer(tokenizer)``, or leave both empty and attach the datamodule to a
    ``Trainer`` whose ``LightningModule`` has a ``tokenizer`` attribute: ``setup`` then takes that one.

    Args:
        tokenizer: Hub id or local path of the tokenizer (``AutoTokenizer.from_pretrained``); ``None`` to
            hand one over later.
        tokenizer_gguf_file: file name of a GGUF checkpoint inside ``tokenizer`` (e.g. the embedded
            SmolLM2's ``SmolLM2-135M-Instruct.Q4_1.gguf``).
        data_dir: folder with local data files; ``None`` loads from the Hugging Face Hub.
        prompt_template: ``"alpaca"`` (default, the MetaMath/PiSSA/SORSA prompt), ``"chat"`` (the
            tokenizer's chat template) or a format string with ``{query}``.
        max_length: maximum training sequence length in tokens (prompt + response + EOS).
        overlength: what to do with longer training examples: ``"truncate"`` cuts the response end,
            ``"drop"`` removes the example. Examples whose prompt alone fills ``max_length`` are always
            dropped (no response token would remain). Counts are logged and kept in ``length_stats``.
        batch_size: training batch size per device (examples per batch; with ``max_tokens_per_batch`` it no
            longer decides the training batches, and stays the default of ``eval_batch_size``).
        eval_batch_size: evaluation batch size per device (default: ``batch_size``).
        num_workers: ``DataLoader`` worker processes.
        seed: seed for the held-out split, shuffling and the length-grouped sampler.
        val_size: number of training examples held out for validation loss; 0 validates on the eval set.
        max_train_examples: use only the first N training examples (``None``: all).
        max_eval_examples: use only the first N examples of each evaluation set (``None``: all).
        group_by_length: batch examples of similar length together (:class:`LengthGroupedSampler`).
        pack_sequences: serve each training batch as one padding-free row (``InstructionCollator(pack=True)``);
            ``LitSVDAdapter`` then runs attention per sequence (``lit_svd.attention``). The loss is the same
            as with padding; the padding FLOPs are gone.
        pack_to_multiple_of: with ``pack_sequences``, round each row up to a multiple of this many tokens
            (``InstructionCollator.pack_to_multiple_of``): a few fixed row shapes, for CUDA graphs.
        max_tokens_per_batch: with ``pack_sequences``, fill each training batch with whole examples up to this
            many tokens per device instead of taking ``batch_size`` examples (as TRL's SFTTrainer does): every
            packed row, rounded up to ``pack_to_multiple_of`` with its padding sequence, has at most this many
            tokens, so peak memory no longer follows the longest batch. Batches are consecutive stretches of
            the seed's order (:class:`TokenBudgetSampler`; the same for the same seed). It must hold
            one example of ``max_length`` tokens, rounded up, and be a multiple of ``pack_to_multiple_of``.
            The batches are formed once and served in another order each epoch, as TRL packs its dataset
            once; every epoch has as many. Under DDP every rank gets as many batches: the epoch's first batches
            repeat to fill the last round. ``None``: ``batch_size`` examples per batch.
        cache_dir: ``datasets`` cache folder for downloads, Arrow files and tokenisation (default: the HF
            cache, ``~/.cache/huggingface/datasets``).
        num_proc: processes for tokenisation with ``datasets.map`` (``None``: in-process).
        bad_records: what the bad records of a local data file or a Hub split (not UTF-8, not JSON, a missing
            or empty field, a dataset's own check such as GSM8K's ``#### N``) do: ``"error"`` stops naming
            the file or Hub split, the line or record and the counts per reason; ``"skip"`` leaves them out,
            warns with the counts, keeps them in ``bad_record_report`` and writes them to TensorBoard
            (``data/bad_records``).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        tokenizer_gguf_file: str | None = None,
        data_dir: str | None = None,
        prompt_template: str = "alpaca",
        max_length: int = 512,
        overlength: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        val_size: int = 0,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        group_by_length: bool = False,
        pack_sequences: bool = False,
        pack_to_multiple_of: int | None = None,
        max_tokens_per_batch: int | None = None,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        bad_records: BadRecords = "error",
    ) -> None:
        super().__init__()
        problems = []
        if bad_records not in ("error", "skip"):
            problems.append(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
        try:
            validate_template(prompt_template)
        except ValueError as error:
            problems.append(str(error))
        if max_length < 2:
            problems.append(f"max_length must be at least 2, got {max_length}")
        if overlength not in ("truncate", "drop"):
            problems.append(f"overlength must be 'truncate' or 'drop', got {overlength!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                problems.append(f"{name} must be positive, got {value}")
        for name, value in (
            ("max_train_examples", max_train_examples),
            ("max_eval_examples", max_eval_examples),
        ):
            if value is not None and value < 1:
                problems.append(f"{name} must be positive or None, got {value}")
        if val_size < 0:
            problems.append(f"val_size must be >= 0, got {val_size}")
        if pack_to_multiple_of is not None and not pack_sequences:
            problems.append("pack_to_multiple_of needs pack_sequences=True (it sizes the packed rows)")
        if pack_to_multiple_of is not None and pack_to_multiple_of < 1:
            problems.append(f"pack_to_multiple_of must be positive or None, got {pack_to_multiple_of}")
        if max_tokens_per_batch is not None:
            problems += _token_budget_problems(max_tokens_per_batch, pack_sequences, max_length, pack_to_multiple_of)
        if problems:
            raise ValueError("; ".join(problems))
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.tokenizer_gguf_file = tokenizer_gguf_file
        self.data_dir = data_dir
        self.prompt_template = prompt_template
        self.max_length = max_length
        self.overlength = overlength
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_size = val_size
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.group_by_length = group_by_length
        self.pack_sequences = pack_sequences
        self.pack_to_multiple_of = pack_to_multiple_of
        self.max_tokens_per_batch = max_tokens_per_batch
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        self.bad_records = bad_records
        self.bad_record_report: list[RecordProblems] = []  # every data file's bad records (when skipped)
        self.tokenizer: Any = None
        self.length_stats: dict[str, dict[str, int]] = {}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.eval_dataset: Dataset | None = None

    # -- hooks for subclasses ---------------------------------------------------------------------

    def _load_train_records(self) -> Dataset:
        """Training records with :data:`CANONICAL_COLUMNS`."""
        raise NotImplementedError(f"{type(self).__name__} must say where its training records come from")

    def _load_eval_records(self) -> Dataset:
        """Evaluation records with :data:`CANONICAL_COLUMNS` (all eval sets, ``max_eval_examples`` each)."""
        raise NotImplementedError(f"{type(self).__name__} must say where its evaluation records come from")

    def make_metric(self) -> Metric:
        """The torchmetrics ``Metric`` that judges this datamodule's evaluation batches."""
        raise NotImplementedError(f"{type(self).__name__} must say which metric judges its evaluation")

    # -- tokenizer --------------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer (e.g. the LightningModule's); forgets datasets tokenised with another one.

        Args:
            tokenizer: a Hugging Face tokenizer with an EOS token.
        """
        if tokenizer is self.tokenizer:
            return  # e.g. the LightningModule handing over the tokenizer setup() already took from it
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before handing it over")
        self.tokenizer = tokenizer
        self.train_dataset = self.val_dataset = self.eval_dataset = None

    def _resolve_tokenizer(self, required: bool) -> Any:
        if self.tokenizer is None and self.tokenizer_name is not None:
            from lit_svd.models import load_tokenizer  # a GGUF's tokenizer is converted once (lit_svd.models)

            self.set_tokenizer(load_tokenizer(self.tokenizer_name, gguf_file=self.tokenizer_gguf_file))
        if self.tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if getattr(module, "tokenizer", None) is not None:
                self.set_tokenizer(module.tokenizer)
        if self.tokenizer is None and required:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer: pass tokenizer='<hub id or path>', call "
                "set_tokenizer(tok), or attach it to a Trainer whose LightningModule has a .tokenizer"
            )
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        """Padding id: the tokenizer's pad token, else its EOS (labels mask padding anyway)."""
        tokenizer = self._resolve_tokenizer(required=True)
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- Lightning hooks --------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download Hub data and, when a tokenizer is known, tokenise once so that every rank hits the cache.

        Local files that are missing are skipped here; ``setup`` reports them for the stage that needs them.
        """
        tokenizer = self._resolve_tokenizer(required=False)
        for load in (self._train_records, self._load_eval_records):
            try:
                records = load()
            except FileNotFoundError:
                continue
            if tokenizer is not None:
                tokenize_instructions(records, tokenizer, self.prompt_template, self.num_proc)

    def setup(self, stage: str | None = None) -> None:
        """Build the tokenised datasets the stage needs (``"fit"``, ``"validate"``, ``"test"``, ...)."""
        tokenizer = self._resolve_tokenizer(required=True)
        needs_train = stage in ("fit", None) or (stage == "validate" and self.val_size > 0)
        if needs_train and self.train_dataset is None:
            train = tokenize_instructions(self._train_records(), tokenizer, self.prompt_template, self.num_proc)
            if self.val_size:
                if self.val_size >= len(train):
                    raise ValueError(f"val_size={self.val_size} leaves no training examples (have {len(train)})")
                order = np.random.default_rng(self.seed).permutation(len(train))
                self.val_dataset = self._apply_overlength(train.select(np.sort(order[: self.val_size])), "val")
                train = train.select(np.sort(order[self.val_size :]))
            self.train_dataset = self._apply_overlength(train, "train")
        needs_eval = stage in ("test", "predict", None) or (stage in ("fit", "validate") and not self.val_size)
        if needs_eval and self.eval_dataset is None:
            records = self._load_eval_records()
            self.eval_dataset = tokenize_instructions(records, tokenizer, self.prompt_template, self.num_proc)
            over = int((_column(self.eval_dataset, "length") > self.max_length).sum())
            self.length_stats["eval"] = {"total": len(self.eval_dataset), "over_max_length": over}
        if self.bad_record_report:
            self._log_bad_records()

    def _log_bad_records(self) -> None:
        """The skipped records' counts, per file and reason, as text in TensorBoard (``data/bad_records``)."""
        logger = getattr(self.trainer, "logger", None) if self.trainer is not None else None
        add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
        if callable(add_text):
            add_text("data/bad_records", "\n\n".join(problems.summary() for problems in self.bad_record_report))

    def _train_records(self) -> Dataset:
        records = self._load_train_records()
        if self.max_train_examples is not None and self.max_train_examples < len(records):
            records = records.select(range(self.max_train_examples))
        return records

    def _apply_overlength(self, dataset: Dataset, split: str) -> Dataset:
        lengths = _column(dataset, "length")
        prompt_lengths = _column(dataset, "prompt_length")
        over = lengths > self.max_length
        prompt_fills = prompt_lengths >= self.max_length
        keep = ~over if self.overlength == "drop" else ~prompt_fills
        stats = {
            "total": len(dataset),
            "over_max_length": int(over.sum()),
            "truncated": int((over & keep).sum()),
            "dropped": int((~keep).sum()),
        }
        self.length_stats[split] = stats
        if stats["over_max_length"]:
            message = (
                f"{type(self).__name__} {split}: {stats['over_max_length']} of {stats['total']} examples are "
                f"longer than max_length={self.max_length}; truncated {stats['truncated']}, "
                f"dropped {stats['dropped']} (overlength={self.overlength!r})"
            )
            # A few long outliers are normal; more than 1% means max_length is probably too small.
            if stats["over_max_length"] > 0.01 * stats["total"]:
                rank_zero_warn(message)
            else:
                rank_zero_info(message)
        if stats["dropped"] == 0:
            return dataset
        return dataset.select(np.flatnonzero(keep))

    # -- dataloaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or length-grouped) training batches of ``batch_size`` examples, or of up to
        ``max_tokens_per_batch`` tokens (:class:`TokenBudgetSampler`); see :class:`InstructionCollator`."""
        if self.train_dataset is None:
            self.setup("fit")
        dataset = self.train_dataset.select_columns(["input_ids", "prompt_length"])
        collate = InstructionCollator(
            self.pad_token_id, self.max_length, pack=self.pack_sequences, pack_to_multiple_of=self.pack_to_multiple_of
        )
        lengths = np.minimum(_column(self.train_dataset, "length"), self.max_length)
        if self.max_tokens_per_batch is not None:
            sampler = TokenBudgetSampler(
                lengths,
                self.max_tokens_per_batch,
                self.pack_to_multiple_of,
                seed=self.seed,
                group_by_length=self.group_by_length,
            )
            # With workers, the loader draws the epoch's order before Lightning's set_epoch (a resumed run).
            sampler.set_epoch(self._training_position()[0])
            return ResumableDataLoader(
                _ExampleLists(dataset),
                None,  # each sampler item is a whole batch
                sampler=sampler,
                collate_fn=collate,
                num_workers=self.num_workers,
                position=self._training_position,
            )
        sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed, group_by_length=self.group_by_length)
        return ResumableDataLoader(
            dataset,
            self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            position=self._training_position,
        )

    def _training_position(self) -> tuple[int, int]:
        """``(epoch, training batches done in it)`` of the attached trainer (for checkpoints)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        """Held-out LM-loss batches (``val_size > 0``) or generation batches from the eval set."""
        if self.val_size:
            if self.val_dataset is None:
                self.setup("validate")
            dataset = self.val_dataset.select_columns(["input_ids", "prompt_length"])
            collate = InstructionCollator(self.pad_token_id, self.max_length)
            return DataLoader(dataset, self.eval_batch_size, collate_fn=collate, num_workers=self.num_workers)
        return self.eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        """Generation batches from the evaluation set."""
        return self.eval_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Generation batches from the evaluation set."""
        return self.eval_dataloader()

    def eval_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Evaluation batches in dataset order, with generation inputs, references and task names.

        Args:
            batch_size: override ``eval_batch_size``.
        """
        if self.eval_dataset is None:
            self.setup("test")
        collate = InstructionCollator(self.pad_token_id, self.max_length, generation_inputs=True)
        return DataLoader(
            self.eval_dataset,
            batch_size or self.eval_batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
        )


def _token_budget_problems(
    max_tokens_per_batch: int, pack_sequences: bool, max_length: int, pack_to_multiple_of: int | None
) -> list[str]:
    """What is wrong with ``max_tokens_per_batch`` next to the other batching options (nothing: ``[]``)."""
    if max_tokens_per_batch < 1:
        return [f"max_tokens_per_batch must be positive or None, got {max_tokens_per_batch}"]
    problems = []
    if not pack_sequences:
        problems.append(
            f"max_tokens_per_batch={max_tokens_per_batch} needs pack_sequences=True (it fills one packed row per "
            "batch), got pack_sequences=False"
        )
    multiple = pack_to_multiple_of if pack_to_multiple_of is not None and pack_to_multiple_of >= 1 else None
    longest_row = packed_row_length(max_length, multiple)
    if max_tokens_per_batch < longest_row:
        rounded = f" (rounded up to pack_to_multiple_of={multiple}: {longest_row})" if multiple else ""
        problems.append(
            f"max_tokens_per_batch={max_tokens_per_batch} cannot hold one example of max_length={max_length} "
            f"tokens{rounded}; pass at least {longest_row}"
        )
    if multiple is not None and max_tokens_per_batch % multiple:
        lower = max_tokens_per_batch - max_tokens_per_batch % multiple
        nearest = " or ".join(str(value) for value in (lower, lower + multiple) if value > 0)
        problems.append(
            f"max_tokens_per_batch={max_tokens_per_batch} must be a multiple of pack_to_multiple_of={multiple} "
            f"(rows are rounded up to it), e.g. {nearest}"
        )
    return problems


def _column(dataset: Dataset, name: str) -> np.ndarray:
    return np.asarray(dataset.with_format("numpy")[name])
