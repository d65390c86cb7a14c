"""Which scaled-dot-product-attention backend PyTorch picks for padded batches, and what a new shape costs.

Hugging Face models call ``F.scaled_dot_product_attention`` with a boolean padding mask. On recent GPUs
PyTorch may pick cuDNN's fused attention, which builds (and caches) an execution plan per input shape: a
batch of a new sequence length pays that build in every layer. Padded training batches, calibration
batches and generation all change their length from one call to the next.

For each backend set (PyTorch's default choice; the same without cuDNN) this times forward + backward of
one attention call over ``--lengths`` distinct sequence lengths (each shape seen once: the first-call cost
that a varying length pays) and again over the same lengths (the cached cost), and names the kernels the
default choice ran.

Usage:
    PYTHONPATH=. python bench/sdpa_backends.py [--batch 8 --heads 32 --dim 128 --lengths 32]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import RESULTS_DIR, environment, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_pass(batch: int, heads: int, dim: int, length: int, device: torch.device) -> None:
    q, k, v = (
        torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    lengths = torch.randint(length // 2, length + 1, (batch,), device=device)
    keep = torch.arange(length, device=device)[None, :] < lengths[:, None]  # right padding
    mask = keep[:, None, None, :] & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()


def timed(lengths: list[int], args: argparse.Namespace, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for length in lengths:
        attention_pass(args.batch, args.heads, args.dim, length, device)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--lengths", type=int, default=32, help="distinct sequence lengths (from 128 up, step 8)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "sdpa_backends.json")
    args = p.parse_args()
    device = torch.device("cuda")
    attention_pass(args.batch, args.heads, args.dim, 64, device)  # CUDA context, cuBLAS: not timed
    results: dict[str, Any] = {"meta": environment(device) | {"args": vars(args)}, "runs": []}
    for offset, (name, backends) in enumerate((("default", None), ("without_cudnn", WITHOUT_CUDNN))):
        lengths = [128 + 8 * (i + offset * args.lengths) for i in range(args.lengths)]  # unseen by the other run
        context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with context:
            first = timed(lengths, args, device)
            again = timed(lengths, args, device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                attention_pass(args.batch, args.heads, args.dim, lengths[0], device)
        ops = sorted({e.key for e in prof.key_averages() if "attention" in e.key or "cudnn" in e.key})
        row = {
            "backends": name,
            "first_call_ms": 1e3 * first / len(lengths),
            "cached_ms": 1e3 * again / len(lengths),
            "ops": ops,
        }
        results["runs"].append(row)
        print(f"{name:14s} new shape {row['first_call_ms']:8.2f} ms/call  seen {row['cached_ms']:8.2f} ms/call  {ops}")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
