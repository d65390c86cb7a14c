"""Adapter init shared across GPUs: 1 GPU vs N GPUs (one process each, NCCL), and the cross-rank checksum.

A Llama-2-7B-shaped stack of decoder projections (32 layers × q, k, v, o 4096×4096, gate, up 11008×4096,
down 4096×11008; random bf16 weights built on each GPU from the same seed, so every rank starts from the
same weights) gets SORSA (or ``--method``) adapters of rank ``--rank`` on all 7 projections:

1. rank 0 alone initialises them (``initialize_adapters(process_count=1)``) while the others wait: the
   1-GPU time;
2. all ranks initialise a fresh copy together (``process_count=N``): each decomposes its share, the
   factors are broadcast from their owners, every rank forms all residuals;
3. ``adapter_checksum`` (on the GPU) of every rank is all-gathered: the factors and residuals must be
   bit-identical on all ranks. Its time is the cost ``SVDInit`` adds at init and at the end of training.

Times are wall seconds with device synchronisation after a warm-up decomposition (cuSOLVER's first call);
the N-GPU time starts at a barrier and is the slowest rank's.

Usage:
    torchrun --nproc_per_node 2 bench/distributed.py [--rank 128] [--layers 32]
    torchrun --nproc_per_node 2 bench/distributed.py --smoke          # 2 small layers, CPU (gloo) ok
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import RESULTS_DIR, environment, synchronize, write_json
from init import MODULES, build_stack, free

from lit_svd import AdapterConfig, initialize_adapters, inject_adapters
from lit_svd.callbacks import adapter_checksum
from lit_svd.linalg import top_r_svd


def timed_init(args: argparse.Namespace, device: torch.device, process_count: int) -> dict[str, Any]:
    model = build_stack(args.layers, args.hidden, args.intermediate, device)
    config = AdapterConfig(method=args.method, rank=args.rank, target_modules=list(MODULES))
    inject_adapters(model, config, initialize=False)
    synchronize(device)
    if process_count > 1:  # all ranks start the clock together: building the stack takes each rank its own time
        dist.barrier()
    start = time.perf_counter()
    report = initialize_adapters(
        model,
        broadcast=(lambda t, src: dist.broadcast(t, src=src)) if process_count > 1 else None,
        process_index=dist.get_rank() if process_count > 1 else 0,
        process_count=process_count,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    checksum = adapter_checksum(model)
    synchronize(device)
    checksum_seconds = time.perf_counter() - start
    del model
    free(device)
    per_rank = [seconds]
    if process_count > 1:  # the init is done when the slowest rank is
        gathered = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(process_count)]
        dist.all_gather(gathered, torch.tensor(seconds, dtype=torch.float64, device=device))
        per_rank = [float(t) for t in gathered]
    return {
        "processes": process_count,
        "init_s": round(max(per_rank), 3),
        "init_s_per_rank": [round(t, 3) for t in per_rank],
        "own_decompositions_s": round(report["decompose_seconds"], 3),
        "decomposed_by_rank_0": report["decomposed"],
        "matrices": report["count"],
        "max_reconstruction_error": report["max_reconstruction_error"],
        "checksum": checksum,
        "checksum_s": round(checksum_seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sorsa")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--smoke", action="store_true", help="2 layers of 64/96, rank 8 (CPU ok); no results file")
    parser.add_argument("--out", default=str(RESULTS_DIR / "distributed_init.json"))
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.rank = 2, 64, 96, 8
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    top_r_svd(torch.randn(2, 512, 256, device=device, dtype=torch.bfloat16), 16)  # warm-up (library init)

    single = timed_init(args, device, 1) if rank == 0 else None
    dist.barrier()
    shared = timed_init(args, device, world)
    checksums = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(checksums, shared["checksum"].to(device))
    if rank == 0:
        identical = all(bool(c == checksums[0]) for c in checksums)
        rows = []
        for row in (single, shared):
            rows.append(row | {"checksum": int(row["checksum"])})
        result = {
            "environment": environment(device),
            "settings": vars(args) | {"world_size": world},
            "results": rows,
            "identical_on_all_ranks": identical,
            "same_as_single_gpu": int(checksums[0]) == rows[0]["checksum"],
            "speedup": round(single["init_s"] / shared["init_s"], 2),
            "ratio_to_single_gpu": round(shared["init_s"] / single["init_s"], 3),
        }
        for row in rows:
            print(row, flush=True)
        print(
            f"{world} processes: init {shared['init_s']} s vs 1: {single['init_s']} s "
            f"({result['ratio_to_single_gpu']}x); identical on all ranks: {identical}; "
            f"same bits as 1 GPU: {result['same_as_single_gpu']}; checksum {shared['checksum_s']} s",
            flush=True,
        )
        if not args.smoke:
            write_json(Path(args.out), result)
            print(f"wrote {args.out}")
        if not identical:
            raise SystemExit("adapters differ across ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
