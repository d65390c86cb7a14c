"""`SVDInit`: initialise every adapter once, on the accelerator, when fitting starts."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_svd.inject import adapter_layers, initialize_adapters

__all__ = ["SVDInit", "adapter_checksum"]


def adapter_checksum(module: torch.nn.Module) -> torch.Tensor:
    """An int64 checksum of the raw bits of every adapter tensor and adapted base weight (equal ⇔ identical)."""
    total = torch.zeros((), dtype=torch.int64)
    for _, layer in adapter_layers(module):
        tensors = [getattr(layer, n) for n in layer.adapter_tensor_names if n != "initialized"]
        for t in [*tensors, layer.base_layer.weight]:
            bits = t.detach().float().flatten().view(torch.int32).to(torch.int64).cpu()
            weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
            total += (bits * weights).sum()  # int64 wrap-around is deterministic, which is all we need
    return total


class SVDInit(Callback):
    """Run the SVD/QR initialisation of all adapters at ``on_fit_start``, once.

    It runs on the device the module lives on (after the strategy moved it there), batched by weight
    shape. It does nothing when every adapter is already initialised, e.g. after restoring a checkpoint
    on resume. Under DDP the factors of rank 0 are broadcast before use, and a checksum of the adapters
    is compared across ranks afterwards.

    Example::

        trainer = Trainer(callbacks=[SVDInit()])
        trainer.fit(LitSVDAdapter(adapter=AdapterConfig(method="sorsa", rank=16)), datamodule=dm)

    Args:
        compute_dtype: Working precision of the decompositions.
        verify_across_ranks: All-gather a checksum after init and at the end of fit; raise if any rank differs.
    """

    def __init__(self, compute_dtype: Literal["float32", "float64"] = "float32", verify_across_ranks: bool = True):
        if compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}")
        self.compute_dtype = getattr(torch, compute_dtype)
        self.verify_across_ranks = verify_across_ranks
        self.report: dict[str, float] | None = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending = [n for n, layer in adapter_layers(pl_module) if not bool(layer.initialized)]
        if not pending:
            rank_zero_info("SVDInit: adapters already initialised (restored or initialised before fit); skipping")
            return
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        broadcast = (lambda t: dist.broadcast(t, src=0)) if distributed else None
        # Only rank 0 decomposes; the others receive its factors (identical results, no wasted work).
        self.report = initialize_adapters(
            pl_module, self.compute_dtype, broadcast=broadcast, compute=not distributed or trainer.global_rank == 0
        )
        rank_zero_info(
            f"SVDInit: initialised {self.report['count']} adapters in {self.report['seconds']:.2f}s "
            f"(max relative reconstruction error {self.report['max_reconstruction_error']:.2e})"
        )
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(
                {
                    "init/seconds": self.report["seconds"],
                    "init/max_reconstruction_error": self.report["max_reconstruction_error"],
                },
                step=0,
            )
        if distributed and self.verify_across_ranks:
            self._verify(trainer, pl_module, "init")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() and self.verify_across_ranks:
            self._verify(trainer, pl_module, "fit")

    def _verify(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        checksum = adapter_checksum(pl_module).to(pl_module.device)
        gathered = trainer.strategy.all_gather(checksum).flatten()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"SVDInit: adapters differ across ranks after {when} (checksums {gathered.tolist()})")
        ranks, value = gathered.numel(), int(gathered[0])
        rank_zero_info(f"SVDInit: adapters identical on all {ranks} ranks after {when} (checksum {value})")
