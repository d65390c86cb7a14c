"""All-reduce and broadcast bandwidth between the GPUs of one host, as DDP sees them (one process per GPU).

Run with NCCL_DEBUG=INFO to see which transport NCCL chose (P2P over NVLink, SHM through host memory, …):
    python -m torch.distributed.run --nproc_per_node 2 bench/nccl_bandwidth.py [--mib 64 1300]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def timed(operation, repeats: int) -> float:
    operation()  # warm-up (connection set-up)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        operation()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[64, 640, 1300])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    for mib in args.mib:
        tensor = torch.ones(int(mib * 2**20 / 4), device="cuda")
        reduce = timed(lambda t=tensor: dist.all_reduce(t), args.repeats)
        send = timed(lambda t=tensor: dist.broadcast(t, 0), args.repeats)
        gb = tensor.numel() * 4 / 1e9
        if rank == 0:
            # Bus bandwidth as nccl-tests defines it: all-reduce moves 2(n-1)/n of the buffer per GPU.
            print(
                f"{mib:7.0f} MiB float32: all_reduce {reduce * 1e3:7.1f} ms "
                f"(busbw {gb * 2 * (world - 1) / world / reduce:6.1f} GB/s), "
                f"broadcast {send * 1e3:7.1f} ms ({gb / send:6.1f} GB/s)",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
