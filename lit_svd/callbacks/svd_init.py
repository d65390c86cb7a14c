"""`SVDInit`: initialise every adapter once, on the accelerator, when fitting starts."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_svd.inject import adapter_layers, initialize_adapters, is_sharded

__all__ = ["SVDInit", "adapter_checksum"]


def adapter_checksum(module: torch.nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
    """An int64 checksum of the raw bits of every adapter tensor and adapted base weight (equal ⇔ identical).

    Computed where the tensors live (or on ``device``), so under NCCL it is a GPU tensor ready for a
    collective, and a 7B model's weights are never copied to the host: a few hundred milliseconds on a
    GPU. Each tensor contributes ``Σ_i i·bits_i`` (int64, wrapping), so order and position both count.

    Returns:
        A 0-dim int64 tensor on the tensors' (or ``device``'s) device.
    """
    total = None
    for _, layer in adapter_layers(module):
        tensors = [getattr(layer, n) for n in layer.adapter_tensor_names if n != "initialized"]
        for t in [*tensors, layer.base_layer.weight]:
            t = t.detach() if device is None else t.detach().to(device)
            bits = t.float().flatten().view(torch.int32).to(torch.int64)
            positions = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
            term = (bits * positions).sum()
            total = term if total is None else total + term  # int64 wrap-around is deterministic
    if total is None:
        return torch.zeros((), dtype=torch.int64, device=device)
    return total


class SVDInit(Callback):
    """Run the SVD/QR initialisation of all adapters at ``on_fit_start``, once.

    It runs on the device the module lives on (after the strategy moved it there), batched by weight
    shape. It does nothing when every adapter is already initialised, e.g. after restoring a checkpoint
    on resume. Under DDP each rank decomposes a share of the matrices and broadcasts its factors, and a
    checksum of the adapters is compared across ranks after init and at the end of training. With
    ``AdapterConfig(base_quantization="nf4")`` each layer's residual is quantized to 4 bits right after its
    init, on the same device, and the reported reconstruction error is that of the 4-bit model.

    Example::

        trainer = Trainer(callbacks=[SVDInit()])
        trainer.fit(LitSVDAdapter(adapter=AdapterConfig(method="sorsa", rank=16)), datamodule=dm)

    Args:
        compute_dtype: Working precision of the decompositions.
        verify_across_ranks: All-gather a checksum after init and at the end of training; raise if any rank
            differs.
    """

    def __init__(self, compute_dtype: Literal["float32", "float64"] = "float32", verify_across_ranks: bool = True):
        if compute_dtype not in ("float32", "float64"):
            raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}")
        self.compute_dtype = getattr(torch, compute_dtype)
        self.verify_across_ranks = verify_across_ranks
        self.report: dict[str, float] | None = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.initialize(trainer, pl_module)

    def initialize(self, trainer: Trainer, pl_module: LightningModule, device: torch.device | None = None) -> None:
        """Initialise every pending adapter of ``pl_module``, sharing the work across ranks.

        Called at ``on_fit_start``, and by ``lit_svd.strategies.AdapterFSDPStrategy`` before it shards the
        model (then with ``device``: the weights are still on the host and each layer visits the device for
        its decomposition and residual).
        """
        pending = [n for n, layer in adapter_layers(pl_module) if not bool(layer.initialized)]
        if not pending:
            rank_zero_info("SVDInit: adapters already initialised (restored or initialised before fit); skipping")
            return
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        # Every rank decomposes its share of the matrices; each share's factors are then broadcast from
        # its owner, so all ranks form bit-identical adapters in about 1/world_size of the time.
        self.report = initialize_adapters(
            pl_module,
            self.compute_dtype,
            broadcast=(lambda t, src: dist.broadcast(t, src=src)) if distributed else None,
            process_index=trainer.global_rank if distributed else 0,
            process_count=trainer.world_size if distributed else 1,
            device=device,
        )
        rank_zero_info(
            f"SVDInit: initialised {self.report['count']} adapters in {self.report['seconds']:.2f}s "
            f"({self.report['decomposed']} decomposed by this rank in {self.report['decompose_seconds']:.2f}s; "
            f"max relative reconstruction error {self.report['max_reconstruction_error']:.2e})"
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
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_end: by then the strategy's teardown has moved the module to the CPU, and NCCL
        # cannot all-gather CPU tensors (nor should 7B weights be checksummed on the host).
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized() and self.verify_across_ranks:
            if is_sharded(pl_module):
                # Under FSDP each rank holds different shards by design (init was verified before sharding).
                return
            self._verify(trainer, pl_module, "training")

    def _verify(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        checksum = adapter_checksum(pl_module, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(checksum).flatten()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"SVDInit: adapters differ across ranks after {when} (checksums {gathered.tolist()})")
        ranks, value = gathered.numel(), int(gathered[0])
        rank_zero_info(f"SVDInit: adapters identical on all {ranks} ranks after {when} (checksum {value})")
