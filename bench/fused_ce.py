"""The language-model loss head: our fused linear cross-entropy vs Liger's vs plain PyTorch, one process.

The recipe's loss is ``lit_svd.losses.linear_cross_entropy``: the frozen output embedding and the
cross-entropy evaluated in row chunks, so the (tokens × vocabulary) logits never exist whole. Liger Kernel's
``LigerFusedLinearCrossEntropyLoss`` (Triton) does the same job; this script decides which the recipe should
use on a GPU (issue 22: keep ours only if it is faster or Liger cannot run there). Every implementation gets
the same hidden states (tokens × H, the compute dtype), the same frozen head (V × H) and targets, and
computes the mean loss and the gradient of the hidden states. Reported per implementation: forward +
backward milliseconds (median of ``--repeats``), the peak memory above the inputs, and the loss and gradient
differences from a float32 reference (full logits in float32, ``F.cross_entropy``).

Usage:
    PYTHONPATH=. python bench/fused_ce.py                       # GPU: Llama-2-7B head (H 4096), vocab 49,152
    PYTHONPATH=. python bench/fused_ce.py --smoke               # CPU: small shapes, ours and torch only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS_DIR, environment, format_table, gb, synchronize, write_json

from lit_svd.losses import linear_cross_entropy

IMPLEMENTATIONS = ("ours", "liger", "torch")


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(hidden, weight, targets)`` of one implementation; raises ``ImportError`` if it cannot run here."""
    if name == "ours":
        return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets)
    if name == "torch":  # what a plain model does: the whole logits matrix, then the loss in float32
        return lambda hidden, weight, targets: F.cross_entropy((hidden @ weight.T).float(), targets)
    if name == "liger":
        if not torch.cuda.is_available():
            raise ImportError("Liger's kernels are Triton kernels for GPUs; this machine has none")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, targets: liger(weight, hidden, targets)
    raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}")


def measure(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, repeats: int) -> dict:
    loss_of = loss_function(name)
    device = hidden.device
    reference_hidden = hidden.detach().float().requires_grad_()
    reference = F.cross_entropy(reference_hidden @ weight.float().T, targets)
    reference.backward()
    times = []
    peak = None
    for repeat in range(repeats + 1):  # the first is a warm-up (Triton compiles, cuBLAS picks kernels)
        x = hidden.detach().clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        synchronize(device)
        start = time.perf_counter()
        loss = loss_of(x, weight, targets)
        loss.backward()
        synchronize(device)
        if repeat:
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
    return {
        "impl": name,
        "ms": round(statistics.median(times) * 1e3, 2),
        "peak_gb": gb(peak) if peak is not None else None,
        "loss_diff": abs(loss.item() - reference.item()),
        "grad_max_diff": (x.grad.float() - reference_hidden.grad).abs().max().item(),
        "grad_scale": reference_hidden.grad.abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="labelled positions in a step")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="small shapes in float32; no results file")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fused_ce.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.dtype, args.repeats = 256, 64, 1000, "float32", 2
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    results = []
    for name in args.impls:
        try:
            results.append(measure(name, hidden, weight, targets, args.repeats))
        except ImportError as reason:  # not installed, or no GPU: say so in the table, not a failure
            results.append({"impl": name, "skipped": str(reason)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in results if r["impl"] == "ours" and "ms" in r), None)
    for row in results:
        if base and "ms" in row:
            row["x_vs_ours"] = round(base["ms"] / row["ms"], 2)
    print(
        format_table(
            results, ["impl", "ms", "x_vs_ours", "peak_gb", "loss_diff", "grad_max_diff", "grad_scale", "skipped"]
        )
    )
    if not args.smoke:
        write_json(args.out, {"environment": environment(device), "settings": vars(args), "results": results})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
