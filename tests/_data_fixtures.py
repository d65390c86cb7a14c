"""Helpers shared by test_data.py and test_eval.py: the real data folder and the SmolLM2 tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

# The shared benchmark data lives beside the repository (../shared/data), never inside it.
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer of the embedded GGUF (converted once, see ``lit_svd.models``),
    with its EOS as the pad token; the cache makes it once per test session."""
    from lit_svd.models import EMBEDDED_MODEL, load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)
