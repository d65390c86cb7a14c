"""`SVDInit`: initialise every adapter once, on the accelerator, when fitting starts."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lit_svd.attention import supports_packing
from lit_svd.calibration import calibrate
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

    Data-aware methods (CorDA, EVA, LoRA-GA) first run a calibration stage (``lit_svd.calibration``): the first
    ``calibration_batches`` batches of the train loader go through the frozen model, statistics of every
    adapted layer's inputs are summed over all ranks (rank ``q`` of ``W`` takes batches ``q, q + W, …`` of
    the first ``W × calibration_batches``, so a run on W GPUs sees the same batches as one on 1 GPU with
    W times as many), turned into init factors and freed; ``init/calibration_s`` logs its cost
    (``init/calibration_pass_s`` and ``init/calibration_finalize_s`` its two stages). It runs here, not in a
    callback of its own, because its only product is the init this callback performs (in
    the same place: at fit start, or before FSDP shards the model) and resume must skip both alike.

    Example::

        trainer = Trainer(callbacks=[SVDInit()])
        trainer.fit(LitSVDAdapter(adapter=AdapterConfig(method="sorsa", rank=16)), datamodule=dm)

    Args:
        compute_dtype: Working precision of the decompositions.
        verify_across_ranks: All-gather a checksum after init and at the end of training; raise if any rank
            differs.
        calibration_batches: Train batches per rank that data-aware inits (CorDA, EVA, LoRA-GA) calibrate on.
        max_calibration_bytes: Cap on the calibration statistics held at once (float32: ``4 n²`` bytes per
            adapted layer with ``n`` inputs, ``4 m n`` for LoRA-GA's gradients); more passes over the batches
            when the layers do not fit at once. ``None``: all layers in one pass.
        pack_calibration_batches: Run padded calibration batches as packed rows (``lit_svd.data.pack_padded_batch``:
            same tokens, statistics and loss, no FLOPs on padding) when the model supports packing. Turn it off
            for a ``compute_loss`` override that does not accept packed batches (``cu_seq_lens``).
    """

    def __init__(
        self,
        compute_dtype: Literal["float32", "float64"] = "float32",
        verify_across_ranks: bool = True,
        calibration_batches: int = 8,
        max_calibration_bytes: int | None = None,
        pack_calibration_batches: bool = True,
    ):
        problems = []
        if compute_dtype not in ("float32", "float64"):
            problems.append(f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            problems.append(f"calibration_batches must be a positive integer, got {calibration_batches!r}")
        if max_calibration_bytes is not None and max_calibration_bytes <= 0:
            problems.append(f"max_calibration_bytes must be positive or None, got {max_calibration_bytes!r}")
        if problems:
            raise ValueError("invalid SVDInit arguments: " + "; ".join(problems))
        self.compute_dtype = getattr(torch, compute_dtype)
        self.verify_across_ranks = verify_across_ranks
        self.calibration_batches = calibration_batches
        self.max_calibration_bytes = max_calibration_bytes
        self.pack_calibration_batches = pack_calibration_batches
        self.report: dict[str, Any] | None = None

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
        init_kwargs: dict[str, Any] = dict(
            compute_dtype=self.compute_dtype,
            broadcast=(lambda t, src: dist.broadcast(t, src=src)) if distributed else None,
            process_index=trainer.global_rank if distributed else 0,
            process_count=trainer.world_size if distributed else 1,
            device=device,
        )
        if any(layer.calibration_statistic for _, layer in adapter_layers(pl_module)):
            self.report = self._calibrate(trainer, pl_module, distributed, init_kwargs)
        else:
            self.report = initialize_adapters(pl_module, **init_kwargs)
        rank_zero_info(
            f"SVDInit: initialised {self.report['count']} adapters in {self.report['seconds']:.2f}s "
            f"({self.report['decomposed']} decomposed by this rank in {self.report['decompose_seconds']:.2f}s; "
            f"max relative reconstruction error {self.report['max_reconstruction_error']:.2e})"
        )
        if trainer.logger is not None and trainer.is_global_zero:
            metrics = {
                "init/seconds": self.report["seconds"],
                "init/max_reconstruction_error": self.report["max_reconstruction_error"],
            }
            if "calibration_seconds" in self.report:
                metrics["init/calibration_s"] = self.report["calibration_seconds"]
                metrics["init/calibration_pass_s"] = self.report["calibration_pass_seconds"]
                metrics["init/calibration_finalize_s"] = self.report["calibration_finalize_seconds"]
            trainer.logger.log_metrics(metrics, step=0)
        if distributed and self.verify_across_ranks:
            self._verify(trainer, pl_module, "init")

    def _calibrate(
        self, trainer: Trainer, pl_module: LightningModule, distributed: bool, init_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Calibration batches of this rank → ``lit_svd.calibration.calibrate`` (statistics summed over ranks)."""
        model = getattr(pl_module, "model", pl_module)
        method = next(layer.method for _, layer in adapter_layers(pl_module) if layer.calibration_statistic)
        ranks = trainer.world_size if distributed else 1
        rank = trainer.global_rank if distributed else 0
        loader = _train_loader(trainer, pl_module, method)
        # The loader's sampler draws its shuffling seed from the global RNG; forking keeps training's batch
        # order the same with or without calibration (and calibration's batches the first ones of that order).
        with torch.random.fork_rng(devices=[]):
            taken = list(itertools.islice(loader, ranks * self.calibration_batches))
        if len(taken) < ranks:
            raise ValueError(
                f"calibration of {method} needs at least {ranks} train batch(es) (one per rank); the train loader "
                f"gave {len(taken)}"
            )
        root = trainer.strategy.root_device

        def all_reduce(tensor: torch.Tensor) -> None:
            # NCCL reduces device tensors only; statistics of a model still on the host (FSDP, before
            # sharding) visit the root device.
            work = tensor.to(root)
            dist.all_reduce(work)
            tensor.copy_(work)

        forward = pl_module.compute_loss if hasattr(pl_module, "compute_loss") else None
        report = calibrate(
            model,
            taken[rank::ranks],
            forward=forward,
            all_reduce=all_reduce if distributed else None,
            max_statistics_bytes=self.max_calibration_bytes,
            pack_batches=self.pack_calibration_batches and supports_packing(model),
            progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
            **init_kwargs,
        )
        rank_zero_info(
            f"SVDInit: calibrated {method} on {report['calibration_batches']} batch(es) per rank x {ranks} rank(s) "
            f"in {report['calibration_seconds']:.2f}s ({report['calibration_passes']} pass(es) "
            f"{report['calibration_pass_seconds']:.2f}s, factors {report['calibration_finalize_seconds']:.2f}s, "
            f"statistics peak {report['calibration_peak_bytes'] / 2**20:.1f} MiB)"
        )
        return report

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


def _train_loader(trainer: Trainer, pl_module: LightningModule, method: str) -> Any:
    """The train loader ``fit`` will use: the datamodule's, the module's, or the one passed to ``fit``."""
    if trainer.datamodule is not None and is_overridden("train_dataloader", trainer.datamodule):
        return trainer.datamodule.train_dataloader()
    if is_overridden("train_dataloader", pl_module):
        return pl_module.train_dataloader()
    # Loaders given to trainer.fit(train_dataloaders=...) are only reachable through the fit loop's source.
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    raise ValueError(
        f"{method} is a data-aware init: its calibration needs a train loader (fit with a datamodule or "
        "train_dataloaders), or initialise the adapters before fit with lit_svd.calibration.calibrate"
    )
