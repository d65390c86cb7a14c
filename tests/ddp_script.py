"""Run by test_ddp.py: 2-process DDP (gloo, CPU) fit; each rank writes adapter checksums to OUT_DIR.

Rank 1 deliberately uses another SVD algorithm, so only the broadcast in SVDInit can make the factors
bit-identical across ranks. ``CollectiveGuard`` applies NCCL's placement rules on the CPU, where gloo would
accept anything: every tensor handed to a collective must be on the strategy's root device, and no
collective may run once the strategy's teardown has moved the module to the CPU (DDP's does), where NCCL
cannot reduce it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model  # noqa: E402
from lightning_helpers import RandomTokensData  # noqa: E402

from lit_svd import AdapterConfig, adapter_state_dict  # noqa: E402
from lit_svd.callbacks import SVDInit, adapter_checksum  # noqa: E402
from lit_svd.module import LitSVDAdapter  # noqa: E402
from lit_svd.strategies import AdapterDDPStrategy  # noqa: E402

COLLECTIVES = ("broadcast", "all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor", "gather")


class CollectiveGuard(L.Callback):
    """Fail a collective whose tensors NCCL would refuse: off the root device, or on a module that the
    strategy's teardown has moved to the host (DDP's teardown does; FSDP's keeps the shards on the GPUs)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.moved_to_host = False

    def setup(self, trainer, pl_module, stage):
        strategy = trainer.strategy
        to_host = pl_module.cpu

        def cpu():
            self.moved_to_host = True
            return to_host()

        pl_module.cpu = cpu
        for name in COLLECTIVES:
            setattr(dist, name, self._guarded(name, getattr(dist, name), strategy))

    def _guarded(self, name, collective, strategy):
        def call(*args, **kwargs):
            tensors = [a for a in args if hasattr(a, "device")]
            tensors += [t for a in args if isinstance(a, list) for t in a if hasattr(t, "device")]
            if self.moved_to_host:
                raise RuntimeError(f"dist.{name} after the strategy's teardown moved the module to the CPU")
            for t in tensors:
                if t.device != strategy.root_device:
                    raise RuntimeError(
                        f"dist.{name} got a tensor on {t.device}; the root device is {strategy.root_device}"
                    )
            self.calls[name] = self.calls.get(name, 0) + 1
            return collective(*args, **kwargs)

        return call


class CountStepBroadcasts(L.Callback):
    """Count DDP's coalesced broadcasts (its buffer sync) made inside training steps."""

    def __init__(self) -> None:
        self.in_step, self.count = False, 0

    def setup(self, trainer, pl_module, stage):
        broadcast = dist._broadcast_coalesced

        def counted(*args, **kwargs):
            self.count += self.in_step
            return broadcast(*args, **kwargs)

        dist._broadcast_coalesced = counted

    def on_train_batch_start(self, *args):
        self.in_step = True

    def on_train_batch_end(self, *args):
        self.in_step = False


class RecordChecksums(L.Callback):
    def __init__(self, out_dir: Path, svd_init: SVDInit, guard: CollectiveGuard, steps: CountStepBroadcasts) -> None:
        self.out_dir, self.svd_init, self.guard, self.steps, self.values = out_dir, svd_init, guard, steps, {}

    def on_fit_start(self, trainer, pl_module):
        self.values["after_init"] = int(adapter_checksum(pl_module))
        self.values["decomposed"] = self.svd_init.report["decomposed"]
        self.values["count"] = self.svd_init.report["count"]
        self.values["calibration_batches"] = self.svd_init.report.get("calibration_batches")
        torch.save(adapter_state_dict(pl_module.model), self.out_dir / f"rank{trainer.global_rank}_init.pt")

    def on_fit_end(self, trainer, pl_module):
        self.values["after_fit"] = int(adapter_checksum(pl_module))
        self.values["collectives"] = self.guard.calls
        self.values["step_broadcasts"] = self.steps.count
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.values))


def main(out_dir: Path, method: str, strategy: str) -> None:
    L.seed_everything(0)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    method, _, quantization = method.partition(":")  # e.g. "sorsa:nf4": a 4-bit base
    config = AdapterConfig(
        method=method,
        rank=4,
        target_modules=["q_proj", "down_proj"],
        svd_method=["full", "gram"][local_rank],
        base_quantization=quantization or None,
    )
    module = LitSVDAdapter(make_tiny_model("llama"), config, learning_rate=1e-2)
    # Data-aware methods (CorDA, EVA) calibrate on 3 batches per rank: rank 0 takes batches 0, 2, 4, rank 1 takes
    # 1, 3, 5 of the (unshuffled) loader, and the statistics are all-reduced.
    svd_init, guard, steps = SVDInit(calibration_batches=3), CollectiveGuard(), CountStepBroadcasts()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy={
            "lit_svd_ddp": AdapterDDPStrategy(),
            "lit_svd_ddp_static": AdapterDDPStrategy(static_graph=True),
        }.get(strategy, strategy),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[guard, svd_init, steps, RecordChecksums(out_dir, svd_init, guard, steps)],
    )
    trainer.fit(module, datamodule=RandomTokensData(count=24, batch_size=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "lit_svd_ddp")
