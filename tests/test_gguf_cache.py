"""A GGUF file is converted once: later loads read the cached Hugging Face folder and give the same model.

The first test parses the embedded SmolLM2 GGUF twice (the cache's first load, and a load with the cache off to
compare against): ~50 s on a 2-core CPU. The others test the cache's bookkeeping without a model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils

from lit_svd import models
from lit_svd.models import EMBEDDED_MODEL, embedded_model_file, gguf_cache_dir, load_causal_lm, load_tokenizer

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def _refuse_gguf(*args, **kwargs):
    raise AssertionError("the GGUF was parsed again although its conversion is cached")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_first_load_converts_and_every_later_load_reads_the_same_model_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_SVD_GGUF_CACHE", str(tmp_path / "cache"))
    first = load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32)
    first_tokenizer = load_tokenizer(EMBEDDED_MODEL)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith(embedded_model_file().stem + "-")
    assert sorted(p.name for p in entry.iterdir()) == ["model", "tokenizer"]  # no temporary folder left behind

    with monkeypatch.context() as patch:  # a hit parses nothing
        patch.setattr(gguf_utils, "load_gguf_checkpoint", _refuse_gguf)
        again = load_causal_lm(EMBEDDED_MODEL, dtype=torch.bfloat16)
        again_tokenizer = load_tokenizer(EMBEDDED_MODEL)

    monkeypatch.setenv("LIT_SVD_GGUF_CACHE", "off")
    direct = load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32)
    direct_tokenizer = load_tokenizer(EMBEDDED_MODEL)

    expected = direct.state_dict()
    for model, dtype in ((first, torch.float32), (again, torch.bfloat16)):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(state[name], value.to(dtype)), name  # bit for bit, dtype as asked
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        assert model.name_or_path == direct.name_or_path  # named after the GGUF's folder, not the cache
        cached_config = model.config.to_dict()
        cached_config.pop("architectures")  # a saved config records them; a GGUF-loaded one does not
        direct_config = direct.config.to_dict() | {"dtype": cached_config["dtype"]}
        direct_config.pop("architectures")
        assert cached_config == direct_config
        assert model.generation_config.to_dict() == direct.generation_config.to_dict()
    for tokenizer in (first_tokenizer, again_tokenizer):
        assert tokenizer(TEXT).input_ids == direct_tokenizer(TEXT).input_ids
        chat = [{"role": "user", "content": TEXT}]
        assert tokenizer.apply_chat_template(chat, tokenize=False) == direct_tokenizer.apply_chat_template(
            chat, tokenize=False
        )
        assert tokenizer.all_special_tokens == direct_tokenizer.all_special_tokens
        assert tokenizer.pad_token == direct_tokenizer.pad_token
        assert tokenizer.name_or_path == direct_tokenizer.name_or_path


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LIT_SVD_GGUF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_dir() == tmp_path / "xdg" / "lit_svd" / "gguf"
    monkeypatch.setenv("LIT_SVD_GGUF_CACHE", str(tmp_path / "mine"))
    assert gguf_cache_dir() == tmp_path / "mine"
    for off in ("off", "0", "False", "no"):
        monkeypatch.setenv("LIT_SVD_GGUF_CACHE", off)
        assert gguf_cache_dir() is None


def test_the_entry_names_the_file_and_its_contents_and_large_files_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_SVD_GGUF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF one")
    entry = models._gguf_cache_entry(gguf, "model")
    assert entry.parent.parent == tmp_path / "cache" and entry.name == "model"
    assert entry.parent.name.startswith("tiny-")
    gguf.write_bytes(b"GGUF two")  # other contents: another entry, never the stale conversion
    assert models._gguf_cache_entry(gguf, "model") != entry
    monkeypatch.setattr(models, "GGUF_CACHE_MAX_FILE_BYTES", 4)
    assert models._gguf_cache_entry(gguf, "model") is None


def test_a_failed_write_warns_leaves_nothing_behind_and_a_lost_race_keeps_the_winner(tmp_path):
    entry = tmp_path / "model-abc" / "model"

    def full_disk(folder: str) -> None:
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.warns(UserWarning, match="cannot cache the converted GGUF at .*No space left on device"):
        assert models._store(entry, full_disk) is False
    assert not entry.exists() and list(entry.parent.iterdir()) == []

    def write(text: str):
        return lambda folder: (Path(folder) / "config.json").write_text(text)

    assert models._store(entry, write("winner")) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # losing a race to an equal conversion is not worth a warning
        assert models._store(entry, write("loser")) is True
    assert (entry / "config.json").read_text() == "winner"
    assert [p.name for p in entry.parent.iterdir()] == ["model"]
