"""Bad records in a data file are counted per reason and line, and never dropped silently."""

from __future__ import annotations

import json

import pytest

from lit_svd.data import load_gsm8k
from lit_svd.data.base import RecordProblems, load_json_records, scan_json_lines
from lit_svd.data.commonsense import load_commonsense_file

GOOD = {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"}


def _write(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _bad_file(path) -> None:
    _write(
        path,
        [
            json.dumps(GOOD).encode(),  # 1
            b'{"question": "broken", "answer": ',  # 2: not JSON
            json.dumps({"question": "caf\u00e9?", "answer": "#### 1"}).encode().replace(b"caf", b"caf\xff"),  # 3
            json.dumps({"question": "no answer field"}).encode(),  # 4
            json.dumps({"question": "   ", "answer": "#### 2"}).encode(),  # 5: empty question
            json.dumps({"question": "q", "answer": "I do not know"}).encode(),  # 6: no #### N
            b"",  # 7: blank, ignored
            json.dumps({"question": "q", "answer": "#### seven"}).encode(),  # 8: not a number
            b"[1, 2]",  # 9: not an object
            json.dumps(GOOD).encode(),  # 10
        ],
    )


def test_every_bad_record_is_named_with_its_line_and_the_run_stops(tmp_path):
    _bad_file(tmp_path / "train.jsonl")
    with pytest.raises(ValueError) as raised:
        load_gsm8k("train", str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'train.jsonl'}: 7 bad records: ")
    for part in [
        "not valid JSON: 1 (line 2)",
        "not UTF-8: 1 (line 3)",
        "missing field 'answer': 1 (line 4)",
        "empty field 'question': 1 (line 5)",
        "no '#### N' numeric answer: 2 (lines 6, 8)",
        "not a JSON object: 1 (line 9)",
        "First at line 2",
        "--data.bad_records skip",
    ]:
        assert part in message, part


def test_skip_loads_the_good_records_and_reports_the_rest(tmp_path):
    _bad_file(tmp_path / "train.jsonl")
    report: list[RecordProblems] = []
    with pytest.warns(UserWarning, match=r"skipping .*train\.jsonl: 7 bad records"):
        records = load_gsm8k("train", str(tmp_path), bad_records="skip", report=report)
    assert len(records) == 2 and records[0]["reference"] == "5"
    (problems,) = report
    assert problems.counts() == {
        "not valid JSON": 1,
        "not UTF-8": 1,
        "missing field 'answer'": 1,
        "empty field 'question'": 1,
        "no '#### N' numeric answer": 2,
        "not a JSON object": 1,
    }


def test_a_clean_file_takes_the_cached_datasets_path_and_a_split_still_applies(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps(GOOD).encode()] * 5)
    assert len(load_json_records(tmp_path / "train.jsonl", ("question", "answer"), split="train[:3]")) == 3
    records, problems = scan_json_lines(tmp_path / "train.jsonl", ("question", "answer"))
    assert len(records) == 5 and problems.total == 0


def test_skipping_keeps_split_expressions(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps(GOOD).encode()] * 4 + [b"not json"] + [json.dumps(GOOD).encode()] * 4)
    with pytest.warns(UserWarning, match="1 bad record: not valid JSON: 1 \\(line 5\\)"):
        dataset = load_json_records(
            tmp_path / "train.jsonl", ("question", "answer"), split="train[:6]", bad_records="skip"
        )
    assert len(dataset) == 6


def test_an_optional_empty_input_is_not_a_bad_record(tmp_path):
    record = {"instruction": "Is the sky blue? Answer true or false.", "input": "", "output": "true", "answer": "true"}
    (tmp_path / "test.json").write_text(json.dumps([record, record | {"answer": ""}]))
    with pytest.raises(ValueError, match=r"1 bad record: empty field 'answer': 1 \(record 2\)\. First at record 2"):
        load_commonsense_file(tmp_path / "test.json", "boolq")
    (tmp_path / "ok.json").write_text(json.dumps([record, record]))
    assert len(load_commonsense_file(tmp_path / "ok.json", "boolq")) == 2  # the empty input is fine


def test_a_hub_split_is_checked_record_by_record_like_a_file(monkeypatch):
    from datasets import Dataset

    rows = [GOOD, {"question": "  ", "answer": "#### 2"}, {"question": "q", "answer": "I do not know"}, GOOD]
    monkeypatch.setattr("lit_svd.data.base.load_dataset", lambda *args, **kwargs: Dataset.from_list(rows))
    with pytest.raises(ValueError) as raised:
        load_gsm8k("train")  # no data_dir: the Hub (here a stand-in returning these rows)
    assert str(raised.value) == (
        "Hub dataset 'openai/gsm8k' (config 'main'), split 'train': 2 bad records: empty field 'question': 1 "
        "(record 2); no '#### N' numeric answer: 1 (record 3). First at record 2. Pass bad_records='skip' "
        "(--data.bad_records skip) to train without them"
    )
    report: list[RecordProblems] = []
    with pytest.warns(UserWarning, match=r"skipping Hub dataset 'openai/gsm8k' .*: 2 bad records"):
        records = load_gsm8k("train", bad_records="skip", report=report)
    assert [r["reference"] for r in records] == ["5", "5"]
    assert report[0].counts() == {"empty field 'question'": 1, "no '#### N' numeric answer": 1}


def test_skipped_records_are_written_to_tensorboard_as_text(tmp_path):
    from _data_fixtures import smollm2_tokenizer
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_svd.data import GSM8KDataModule

    _bad_file(tmp_path / "train.jsonl")
    _write(tmp_path / "test.jsonl", [json.dumps(GOOD).encode()])
    logger = TensorBoardLogger(tmp_path / "runs", name="bad")
    datamodule = GSM8KDataModule(data_dir=str(tmp_path), bad_records="skip", cache_dir=str(tmp_path / "cache"))
    datamodule.set_tokenizer(smollm2_tokenizer())
    datamodule.trainer = Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
    with pytest.warns(UserWarning, match="skipping"):
        datamodule.setup("fit")
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    (event,) = events.Tensors("data/bad_records/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert text.startswith(f"{tmp_path / 'train.jsonl'}: 7 bad records: ") and "not UTF-8: 1 (line 3)" in text
