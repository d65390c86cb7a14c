"""Print the CPU model and how much slower a bfloat16 matrix product is than float32 on it.

CI prints this first (``.ci/run``): on CPUs without native bf16 (AVX2-only, e.g. some AMD EPYC) a bf16 product
is ~30× slower than float32, so a test that computes in bf16 on such a machine crawls. Usage:
``python bench/cpu_bf16.py`` (``ONEDNN_MAX_CPU_ISA=AVX2`` simulates such a CPU on a newer one).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def seconds_per_matmul(dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds of one (2048×576) @ (576×1536) product in ``dtype`` (SmolLM2's MLP shape), best of ``repeats``."""
    a, b = torch.randn(2048, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    native = sorted(flags & {"avx512_bf16", "amx_bf16"}) or ["none"]
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        native.append(f"capped by ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
    fp32, bf16 = seconds_per_matmul(torch.float32), seconds_per_matmul(torch.bfloat16)
    print(
        f"CPU: {cpu_model()} ({torch.get_num_threads()} threads; native bf16 flags: {', '.join(native)}); "
        f"2048x576 @ 576x1536: float32 {fp32 * 1e3:.1f} ms, bfloat16 {bf16 * 1e3:.1f} ms ({bf16 / fp32:.1f}x float32)"
    )


if __name__ == "__main__":
    main()
