"""Helpers for the tests that run recipes: model folders that load fast, and the ``lightning`` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.py"))


def lightning_command() -> list[str]:
    """The installed ``lightning`` console script of this environment."""
    exe = shutil.which("lightning", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `lightning` console script is not installed (pip install -e .)"
    return [exe]


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 32) with the real SmolLM2 tokenizer, saved as a Hugging Face folder.

    Loads in well under a second, so a recipe run on it costs the Python start-up and little else.
    """
    from _data_fixtures import smollm2_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_smollm2(folder: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct (float32) re-saved as safetensors: the GGUF's ~12 s of
    dequantisation once per session instead of once per recipe run."""
    from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer

    load_causal_lm(EMBEDDED_MODEL, dtype=torch.float32).save_pretrained(folder)
    load_tokenizer(EMBEDDED_MODEL).save_pretrained(folder)
    return folder


def run_lightning(args: list[str], timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``lightning ARGS`` from the repository root; returns the finished process and its wall time (s).

    stdout and stderr are one stream (``done.stdout``), unbuffered, so its order is the terminal's.
    """
    start = time.perf_counter()
    done = subprocess.run(
        [*lightning_command(), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    return done, time.perf_counter() - start


def last_line(done: subprocess.CompletedProcess) -> str:
    """The last non-empty line of a ``run_lightning`` process's output."""
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""
