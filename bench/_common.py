"""Helpers shared by the bench scripts: environment record, timing, JSON results and plain-text tables.

Kept dependency-free beyond torch so that ``python bench/<name>.py`` runs on any CUDA machine with
lit_svd importable (``pip install -e .`` or ``PYTHONPATH=.``).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Timer", "environment", "format_table", "gb", "synchronize", "write_json"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    # The device machine gets a copy of the tree without .git: the caller may pass the commit instead.
    if os.environ.get("LIT_SVD_COMMIT"):
        return os.environ["LIT_SVD_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions, date and command line, stored with every result file."""
    import lit_svd

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "lit_svd_file": lit_svd.__file__,
        "lit_svd_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["multiprocessors"] = props.multi_processor_count
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that host clocks measure it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a ``with`` block, synchronising the device on entry and exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def gb(n_bytes: float) -> float:
    """Bytes to decimal gigabytes (1e9), the unit of the SPEC's anchors, rounded for tables."""
    return round(n_bytes / 1e9, 2)


def random_llama(
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    vocab: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    max_positions: int = 4096,
):
    """A randomly initialised Llama (seed 0) built directly on ``device`` in ``dtype`` (no float32 copy, no
    meta tensors), SDPA attention, untied embeddings, no KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int, tokens_per_step: int) -> dict:
    """Run ``warmup`` untimed and ``steps`` timed calls of ``step`` from a clean allocator state.

    Returns ``steps``, ``seconds``, ``step_ms``, ``tokens_per_s`` and, on CUDA, ``memory_before_steps_gb``
    (allocated before the first step) and ``peak_memory_gb``/``peak_memory_gib`` (over warm-up and timed steps).
    """
    import gc

    info: dict[str, Any] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        info["memory_before_steps_gb"] = gb(torch.cuda.memory_allocated(device))
    for _ in range(warmup):
        step()
    with Timer(device) as timer:
        for _ in range(steps):
            step()
    info |= {
        "steps": steps,
        "seconds": timer.seconds,
        "step_ms": 1e3 * timer.seconds / steps,
        "tokens_per_s": steps * tokens_per_step / timer.seconds,
    }
    if device.type == "cuda":
        info["peak_memory_gb"] = gb(torch.cuda.max_memory_allocated(device))
        info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return info


def device_profiler(device: torch.device) -> torch.profiler.profile:
    """A ``torch.profiler`` capture of host operators, and of CUDA kernels on a CUDA ``device``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def top_operators(capture: torch.profiler.profile, device: torch.device, top: int = 15, steps: int = 1) -> list[dict]:
    """The operators (CUDA: kernels) that took the most device (CPU: self) time: ``ms`` and ``calls`` per step of
    the ``steps`` the capture covered."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(capture.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"name": e.key, "ms": getattr(e, key) / 1e3 / steps, "calls": e.count / steps} for e in events]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically, so a run killed mid-way leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: dict[str, Callable] | None = None) -> str:
    """A fixed-width text table of ``rows`` restricted to ``columns`` (missing cells print as '-')."""
    fmt = fmt or {}

    def cell(row: dict[str, Any], col: str) -> str:
        value = row.get(col)
        if value is None:
            return "-"
        if col in fmt:
            return fmt[col](value)
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
