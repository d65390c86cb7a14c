"""``initialize_adapters`` shared by several processes, simulated in one process with threads.

Each thread plays one rank with its own copy of the model; ``broadcast(tensor, src)`` copies the owner's
tensor to the others through a barrier, as ``torch.distributed.broadcast`` would. The 2-process DDP
test (tests/test_ddp.py) covers the real collectives; this one checks the bookkeeping for any split.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_model

from lit_svd import AdapterConfig, adapter_state_dict, initialize_adapters, inject_adapters
from lit_svd.inject import _share


class ThreadBroadcast:
    """``broadcast(tensor, src)`` among ``count`` threads, one call per thread and tensor, in order."""

    def __init__(self, count: int) -> None:
        self.barrier = threading.Barrier(count)
        self.slot: torch.Tensor | None = None
        self.calls = [0] * count

    def for_rank(self, rank: int):
        def broadcast(tensor: torch.Tensor, src: int) -> None:
            self.calls[rank] += 1
            if rank == src:
                self.slot = tensor.clone()
            self.barrier.wait()
            if rank != src:
                tensor.copy_(self.slot)
            self.barrier.wait()

        return broadcast


def _shared_init(method: str, count: int, targets: list[str]) -> list[tuple[dict, dict]]:
    models = [make_tiny_model("llama") for _ in range(count)]
    config = AdapterConfig(method=method, rank=4, target_modules=targets)
    for model in models:
        inject_adapters(model, config, initialize=False)
    broadcast, results = ThreadBroadcast(count), [None] * count

    def run(rank: int) -> None:
        report = initialize_adapters(
            models[rank], broadcast=broadcast.for_rank(rank), process_index=rank, process_count=count
        )
        results[rank] = (report, {k: v.clone() for k, v in adapter_state_dict(models[rank]).items()})

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.parametrize(("method", "count"), [("sorsa", 2), ("olora", 3), ("pissa", 4)])
def test_every_rank_ends_with_the_single_process_adapters(method, count):
    # 2 layers × (q_proj, down_proj, up_proj): groups of 2 matrices, so with 3 or 4 ranks some own none.
    targets = ["q_proj", "up_proj", "down_proj"]
    results = _shared_init(method, count, targets)
    single = make_tiny_model("llama")
    inject_adapters(single, AdapterConfig(method=method, rank=4, target_modules=targets), initialize=False)
    initialize_adapters(single)
    expected = adapter_state_dict(single)
    assert sum(report["decomposed"] for report, _ in results) == 6  # each matrix decomposed exactly once
    for report, state in results:
        assert report["count"] == 6
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    # and the ranks agree bit for bit (the factors came from one owner each)
    for _, state in results[1:]:
        assert all(torch.equal(state[k], results[0][1][k]) for k in state)


def test_shares_partition_the_matrices_in_near_equal_contiguous_parts():
    for items, count in [(7, 2), (2, 4), (32, 3), (0, 2)]:
        bounds = [_share(list(range(items)), q, count) for q in range(count)]
        assert bounds[0][0] == 0 and bounds[-1][1] == items
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [stop - first for first, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_several_processes_need_a_broadcast_and_a_valid_index():
    model = make_tiny_model("llama")
    inject_adapters(model, AdapterConfig(method="sorsa", rank=4, target_modules=["q_proj"]), initialize=False)
    with pytest.raises(ValueError, match="process_count=2 needs a broadcast"):
        initialize_adapters(model, process_count=2, process_index=1)
    with pytest.raises(ValueError, match=r"process_index 2 is outside \[0, process_count=2\)"):
        initialize_adapters(model, broadcast=lambda t, src: None, process_index=2, process_count=2)
