"""Strategies for several processes: DDP without per-step buffer broadcasts, and FSDP2 for adapters.

``AdapterDDPStrategy`` is what ``--strategy ddp`` means for the recipes: Lightning's ``DDPStrategy`` with
``broadcast_buffers=False``. DDP's default re-sends every buffer from rank 0 before each forward; an adapted
model's buffers are the init snapshots of the adapters (``init_*``, as large as the adapters: 1.3 GB in
float32 for a 7B model at r = 128), OSoRA's frozen factors and flags, all identical on every rank by
construction (``SVDInit`` checks it with a checksum) and never changed by training, so the broadcast only
costs time.

``AdapterFSDPStrategy`` is what ``--strategy fsdp`` means for the recipes: FSDP2 (``fully_shard``) through
Lightning's ``ModelParallelStrategy``. The order of a fit is:

1. (resume only) the adapter tensors are read from the checkpoint — every rank reads the whole adapter,
   which is small — and each residual ``W − P_0 Q_0ᵀ`` is rebuilt on the full original weight;
2. otherwise ``SVDInit`` initialises the adapters on the full weights, the decompositions shared across
   ranks. A model that fits in 60 % of a GPU's free memory is moved there whole first (one transfer);
   a larger one stays in host memory and each layer visits the GPU in turn;
3. every decoder layer, then the root, is ``fully_shard``-ed over all ranks: each GPU keeps 1/world of
   each frozen base weight (in its dtype, e.g. bf16) and of each adapter tensor. Under ``bf16-mixed``
   (``16-mixed``) with float32 adapters, FSDP's ``MixedPrecisionPolicy`` all-gathers the adapter shards in
   bf16 (fp16) for the forward, as autocast would compute with them anyway, and reduces their gradients in
   float32 into the float32 shards the optimizer updates;
4. the optimizer is built over the adapter parameters only, so only they hold optimizer state.

Checkpoints hold the adapter tensors and the optimizer state only (sharded, one file per rank with
``torch.distributed.checkpoint``); the frozen base is never written. ``LitSVDAdapter.adapter_state()``
gathers the (small) adapter onto every rank for exports.

Why FSDP2 rather than Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens each wrapped module's
parameters into one flat buffer of one dtype, so float32 adapters next to a bf16 base need
``adapter_dtype=bfloat16`` or wrapping each adapter separately, and its ``use_orig_params`` views make
adapter-only state dicts awkward. FSDP2 shards each parameter on its own (``DTensor``), keeps each dtype,
and checkpoints any subset of tensors with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import (
    _METADATA_FILENAME,
    _distributed_checkpoint_load,
    _is_sharded_checkpoint,
)
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.constants import default_pg_timeout
from typing_extensions import override

from lit_svd.inject import adapter_layers, adapter_state_dict, is_sharded, move_if_it_fits

__all__ = ["AdapterDDPStrategy", "AdapterFSDPStrategy", "fsdp_mixed_precision", "refuse_quantized_bases", "shard_model"]

_GRADIENT_HOOKS = {"float32": None, "bfloat16": "bf16_compress_hook", "float16": "fp16_compress_hook"}


class AdapterDDPStrategy(DDPStrategy):
    """DDP for ``LitSVDAdapter``: no buffer broadcast before each forward; optional half-precision all-reduce.

    Example::

        trainer = Trainer(accelerator="gpu", devices=2, strategy=AdapterDDPStrategy(), precision="bf16-mixed")

    Args:
        gradient_dtype: dtype of the gradient all-reduce. ``"float32"`` (default) reduces the float32 adapter
            gradients as they are; ``"bfloat16"``/``"float16"`` halve the traffic with PyTorch's compression
            hooks (each gradient is rounded before the average; the optimizer still updates float32 tensors).
        find_unused_parameters: as in ``DistributedDataParallel``.
        bucket_cap_mb: size of DDP's gradient buckets (``None``: PyTorch's 25 MB). Each bucket is all-reduced
            as soon as its gradients are ready, beside the rest of the backward; a bucket larger than all the
            adapter gradients makes one all-reduce after the backward instead (docs/distributed.md measures
            both on a 7B model).
        gradient_as_bucket_view: let the gradients be views into the buckets (as in
            ``DistributedDataParallel``): no copy into and out of the buckets, and no second gradient-sized
            buffer.
        static_graph: as in ``DistributedDataParallel``: the set of parameters that get gradients, and the
            order they get them in, are the same every step (true of adapters); DDP then skips its per-step
            bookkeeping and fixes its buckets to the observed gradient order after the first step. On 2 H200s
            (7B shape) it gave no gain, so it stays off by default (docs/distributed.md).
        process_group_backend: ``None``: NCCL on GPUs, gloo on CPUs.
        timeout: Collective timeout.
    """

    strategy_name = "lit_svd_ddp"

    def __init__(
        self,
        gradient_dtype: str = "float32",
        find_unused_parameters: bool = False,
        bucket_cap_mb: float | None = None,
        gradient_as_bucket_view: bool = False,
        static_graph: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if gradient_dtype not in _GRADIENT_HOOKS:
            raise ValueError(f"gradient_dtype {gradient_dtype!r} is not one of {sorted(_GRADIENT_HOOKS)}")
        hook = None
        if _GRADIENT_HOOKS[gradient_dtype] is not None:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = getattr(default_hooks, _GRADIENT_HOOKS[gradient_dtype])
        super().__init__(
            ddp_comm_hook=hook,
            process_group_backend=process_group_backend,
            timeout=timeout,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=gradient_as_bucket_view,
            static_graph=static_graph,
            **({} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}),
        )
        self.gradient_dtype = gradient_dtype


def fsdp_mixed_precision(model: torch.nn.Module, precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for ``model`` under Lightning ``precision``, or ``None`` for none.

    Under ``bf16-mixed``/``16-mixed`` with adapter tensors in a wider dtype than the compute dtype (float32
    adapters beside a bf16 base, the default), the adapter shards are all-gathered in the compute dtype
    and their gradients reduced in float32: half the gather traffic, and the same products autocast would
    compute. Otherwise (``32-true``, or adapters already in the compute dtype) no policy: every tensor is
    gathered in its own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if compute is None:
        return None
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    if not trained or trained == {compute}:
        return None
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, mesh, mp_policy=None) -> torch.nn.Module:
    """``fully_shard`` every decoder layer of a transformers model, then its body (``base_model``), over ``mesh``.

    Per-layer units keep the all-gathered (unsharded) weights to one decoder layer at a time. The root unit
    is the body, not the whole model, because the fused loss calls the body and then reads the output
    embedding's weight itself: the (frozen) LM head stays an ordinary replicated tensor, which a tied head
    already is (it keeps the original embedding tensor, which never changes).
    """
    from torch.distributed.fsdp import fully_shard

    from lit_svd.module import decoder_layers

    options = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    body = getattr(model, "base_model", model)
    fully_shard(body, mesh=mesh, **options)
    return model


def refuse_quantized_bases(module: torch.nn.Module) -> None:
    """Raise if any adapter of ``module`` has a 4-bit base: FSDP does not shard ``NF4Linear`` buffers (yet)."""
    quantized = [name for name, layer in adapter_layers(module) if layer.base_quantization is not None]
    if quantized:
        raise ValueError(
            f"AdapterFSDPStrategy cannot shard 4-bit (NF4) bases (e.g. layer '{quantized[0]}'): train a 4-bit "
            "model with DDP (a 7B model in 4 bits fits one GPU) or set base_quantization=None for FSDP"
        )


class AdapterFSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all processes for ``LitSVDAdapter``: init on full weights, then shard; adapter-only checkpoints.

    Example::

        trainer = Trainer(accelerator="gpu", devices=2, strategy=AdapterFSDPStrategy(), precision="bf16-mixed")

    Args:
        process_group_backend: ``None``: NCCL on GPUs, gloo on CPUs.
        timeout: Collective timeout.
    """

    strategy_name = "lit_svd_fsdp"

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout
    ) -> None:
        # Pure data parallelism: one mesh dimension over every process (no tensor parallelism). Checkpoints
        # are always sharded (one file per rank): a single file would need the whole optimizer on rank 0.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._checkpoint_to_restore: Path | None = None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Restore *before* sharding: the residuals are rebuilt on full weights, and SVDInit then sees
        # initialised adapters and never re-runs the decompositions on resume.
        return False

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer) -> None:
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        from lit_svd.callbacks import SVDInit

        self.accelerator.setup(trainer)
        module = self.lightning_module
        refuse_quantized_bases(module)
        if not is_sharded(module):
            move_if_it_fits(module, self.root_device)
            pending = [n for n, layer in adapter_layers(module) if not bool(layer.initialized)]
            if pending:
                svd_init = next((cb for cb in trainer.callbacks if isinstance(cb, SVDInit)), None) or SVDInit()
                svd_init.initialize(trainer, module, device=self.root_device)
            policy = fsdp_mixed_precision(module.model, self.precision_plugin.precision)
            shard_model(module.model, self.device_mesh["data_parallel"], policy)
        # What ModelParallelStrategy.setup does after the user's configure_model has parallelised the model.
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == "fit":
            _optimizers_to_device(self.optimizers, self.root_device)
            if self._checkpoint_to_restore is not None:
                self._load_optimizer_states(self._checkpoint_to_restore)
                self._checkpoint_to_restore = None

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Adapter tensors only (``DTensor`` shards for the trained ones); the frozen base is never saved."""
        return {f"model.{k}": v for k, v in adapter_state_dict(self.lightning_module.model).items()}

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is not a sharded lit_svd checkpoint folder (written by AdapterFSDPStrategy); "
                "resume a DDP or single-device checkpoint with the strategy that wrote it"
            )
        checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
        # Every rank reads the whole adapter (megabytes) into full tensors, resharded by the reader; the
        # module's on_load_checkpoint then rebuilds the residuals on the still unsharded weights.
        state = {"state_dict": {k: v.clone() for k, v in self.lightning_module_state_dict().items()}}
        _distributed_checkpoint_load(state, path)
        checkpoint["state_dict"] = state["state_dict"]
        self._checkpoint_to_restore = path
        rank_zero_info(f"AdapterFSDPStrategy: adapter tensors read from {path}")
        return checkpoint

    def _load_optimizer_states(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(self.model, optimizer)}
            _distributed_checkpoint_load(state, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[key])


if "lit_svd_ddp" not in StrategyRegistry:
    StrategyRegistry.register(
        "lit_svd_ddp", AdapterDDPStrategy, description="DDP for lit_svd adapters (no per-step buffer broadcast)"
    )
if "lit_svd_fsdp" not in StrategyRegistry:
    StrategyRegistry.register(
        "lit_svd_fsdp", AdapterFSDPStrategy, description="FSDP2 for lit_svd adapters (init on full weights, then shard)"
    )
