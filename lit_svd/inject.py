"""Find target layers in a Hugging Face model, swap adapters in and out, and move adapter state.

Adapter state dicts hold, per adapted layer, the trainable tensors, the frozen adapter buffers, the
init-time snapshot ``init_<name>`` of each trainable tensor (for methods whose init changes the base
weight) and the ``initialized`` flag. Loading onto a model built from the *original* pretrained weights
rebuilds each residual as ``W − delta(snapshot)`` with the same float32 arithmetic as at init, so the
exact trained model comes back without storing any m×n matrix and without re-running the SVD.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from lit_svd.adapters import AdapterLayer, get_adapter_class
from lit_svd.config import AdapterConfig
from lit_svd.linalg import (
    bottom_r_svd,
    local_tensor,
    orthonormality_error,
    orthonormality_error_from_gram,
    thin_qr,
    top_r_svd,
)
from lit_svd.quantization import quantizable_dtype

__all__ = [
    "adapter_layers",
    "fits_on_device",
    "move_if_it_fits",
    "inject_adapters",
    "is_sharded",
    "initialize_adapters",
    "merge_adapters",
    "orthonormal_factor_groups",
    "orthonormal_regularizer",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "trainable_parameter_count",
]

# Decompositions of W alone that initialize_adapters computes (batched, shared across ranks); other
# methods' init reads nothing (LoRA) or what the calibration stage left on the layer (CorDA, EVA).
_DECOMPOSITIONS = ("svd", "minor_svd", "qr")
# Stacking same-shape weights for one batched decomposition is capped so CPU runs don't double RAM.
_MAX_BATCH_BYTES = 2 * 1024**3
_T = TypeVar("_T")


def stacked_chunks(
    items: Sequence[_T], matrix_shape: tuple[int, ...], element_bytes: int = 4
) -> Iterator[Sequence[_T]]:
    """Consecutive slices of ``items`` whose (m, n) matrices, stacked, take at most ``_MAX_BATCH_BYTES``
    (at least one item per slice): the batches in which same-shape decompositions run."""
    per_chunk = max(1, _MAX_BATCH_BYTES // (element_bytes * matrix_shape[0] * matrix_shape[1]))
    for start in range(0, len(items), per_chunk):
        yield items[start : start + per_chunk]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(dotted name, layer)`` for every adapter in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _weight_shape(layer: nn.Module) -> tuple[int, int]:
    rows, cols = layer.weight.shape
    return (cols, rows) if isinstance(layer, Conv1D) else (rows, cols)


def _leaf_names(names: list[str], limit: int = 12) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return ", ".join(leaves[:limit]) + (", …" if len(leaves) > limit else "")


def _find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, (nn.Linear, Conv1D))]
    if target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [n for n in linear if modules[n] is not output]
        if not targets:
            raise ValueError("target_modules='all-linear' matched no linear layer in this model")
        return targets
    if isinstance(target_modules, str):
        targets = [n for n in linear if re.fullmatch(target_modules, n)]
        if not targets:
            raise ValueError(
                f"target regex {target_modules!r} matched no linear layer (it must match the full dotted "
                f"path, e.g. {linear[0] if linear else '…'}); linear layers here: {_leaf_names(linear)}"
            )
        return targets
    problems, targets = [], []
    for wanted in target_modules:
        matched = [n for n in linear if n == wanted or n.endswith("." + wanted)]
        if matched:
            targets += matched
            continue
        other = [n for n in modules if n and (n == wanted or n.endswith("." + wanted))]
        if other:
            kind = type(modules[other[0]]).__name__
            problems.append(f"target {wanted!r} matched '{other[0]}' ({kind}), which is not a linear layer")
        else:
            problems.append(f"target {wanted!r} matched nothing; linear layers here: {_leaf_names(linear)}")
    if problems:
        raise ValueError("; ".join(problems))
    return [n for n in linear if n in set(targets)]


def _check_finite(named_weights: Mapping[str, torch.Tensor]) -> None:
    bad = [n for n, w in named_weights.items() if not w.is_meta and not torch.isfinite(w).all()]
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in the weight of layer(s): {', '.join(bad)}")


def inject_adapters(model: nn.Module, config: AdapterConfig, initialize: bool = True) -> nn.Module:
    """Replace every targeted ``nn.Linear``/``Conv1D`` of ``model`` by an adapter layer, in place.

    All other parameters are frozen. Every input problem is detected before the model is touched.

    Args:
        model: A Hugging Face (or any) ``nn.Module`` without lit_svd adapters.
        config: Method, rank, targets and options.
        initialize: Run ``initialize_adapters`` right away. Pass ``False`` to defer the weight-dependent
            init (e.g. to the ``SVDInit`` callback, on the accelerator, after the weights are loaded).

    Returns:
        The same ``model``.
    """
    existing = next(adapter_layers(model), None)
    if existing is not None:
        raise ValueError(
            f"model already has lit_svd adapters (e.g. '{existing[0]}'); merge_adapters() first or start "
            "from a freshly loaded model"
        )
    adapter_cls = get_adapter_class(config.method)
    targets = _find_targets(model, config.target_modules)
    modules = dict(model.named_modules())
    rank = config.layer_rank
    too_big = [f"'{n}' {_weight_shape(modules[n])}" for n in targets if rank > min(_weight_shape(modules[n]))]
    if too_big:
        raise ValueError(f"rank {rank} exceeds min(out, in) of layer(s): {', '.join(too_big)}")
    if config.base_quantization is not None:
        dtypes = {n: modules[n].weight.dtype for n in targets}
        unquantizable = [f"'{n}' ({dtype})" for n, dtype in dtypes.items() if not quantizable_dtype(dtype)]
        if unquantizable:
            raise ValueError(
                f"base_quantization={config.base_quantization!r} takes float32/bfloat16/float16 weights; "
                f"layer(s) {', '.join(unquantizable[:3])}{' …' if len(unquantizable) > 3 else ''} are not: load "
                "the model in one of those dtypes"
            )
    if initialize:
        _check_finite({n: modules[n].weight for n in targets})

    adapter_dtype = getattr(torch, config.adapter_dtype) if config.adapter_dtype else None
    scaling = config.scaling if adapter_cls.scaled else 1.0
    options = {keyword: getattr(config, field) for field, keyword in adapter_cls.config_options.items()}
    created = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = adapter_cls(
            modules[name],
            rank=rank,
            scaling=scaling,
            dropout=config.dropout,
            adapter_dtype=adapter_dtype,
            svd_method=config.svd_method,
            name=name,
            base_quantization=config.base_quantization,
            double_quantization=config.double_quantization,
            **options,
        )
        setattr(parent, child, layer)
        created.append(layer)
    adapter_cls.share_across(created)
    model.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for tensor_name in layer.trainable_names:
            getattr(layer, tensor_name).requires_grad_(True)
    model.lit_svd_config = config
    if initialize:
        initialize_adapters(model)
    return model


def _share(items: list, process_index: int, process_count: int) -> tuple[int, int]:
    """``[first, stop)`` of the contiguous, near-equal share of ``items`` that ``process_index`` owns."""
    per, extra = divmod(len(items), process_count)
    first = process_index * per + min(process_index, extra)
    return first, first + per + (process_index < extra)


def _decompose(
    decomposition: str, layers: list[AdapterLayer], rank: int, svd_method: str, dtype: torch.dtype, device
) -> tuple[torch.Tensor, ...]:
    """Batched top-r (or, for ``"minor_svd"``, bottom-r) SVD ``(U, S, V)`` or thin QR ``(Q_r, R_r)`` of the
    layers' weights, on ``device``."""
    # The SVD keeps the storage dtype (bf16 weights take a tensor-core Gram product and are read in float64
    # after that); QR works in the compute dtype.
    stacked = torch.stack(
        [
            (layer.weight_matrix() if decomposition != "qr" else layer.weight_matrix().to(dtype)).to(device)
            for layer in layers
        ]
    )
    if decomposition == "svd":
        factors = top_r_svd(stacked, rank, method=svd_method, dtype=dtype)
    elif decomposition == "minor_svd":
        factors = bottom_r_svd(stacked, rank, dtype=dtype)
    else:
        factors = thin_qr(stacked, rank, dtype=dtype)
    return tuple(t.contiguous() for t in factors)


def _factor_shapes(decomposition: str, count: int, shape: tuple[int, int], rank: int) -> list[tuple[int, ...]]:
    m, n = shape
    if decomposition in ("svd", "minor_svd"):
        return [(count, m, rank), (count, rank), (count, n, rank)]
    return [(count, m, rank), (count, rank, n)]


@torch.no_grad()
def initialize_adapters(
    model: nn.Module,
    compute_dtype: torch.dtype = torch.float32,
    broadcast: Callable[[torch.Tensor, int], None] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Initialise every adapter not yet initialised, one batched decomposition per weight shape.

    The SVD/QR runs on ``device`` (default: where each weight lives; move the model to the GPU first, or
    pass the GPU here to decompose CPU-resident weights layer by layer, e.g. before FSDP shards them).

    Several processes (DDP/FSDP ranks) share the work: each weight shape's layers are split into
    ``process_count`` contiguous shares, process ``q`` decomposes share ``q`` only, and each share's
    factors are then broadcast from its owner, so every process forms bit-identical adapters and
    residuals while the decompositions take about ``1 / process_count`` of the time.

    Args:
        model: Model with injected adapters.
        compute_dtype: Working precision of the decompositions (float32, or float64 for reference runs).
        broadcast: ``broadcast(tensor, src)``: in-place broadcast of ``tensor`` from process ``src`` to
            all (e.g. ``torch.distributed.broadcast``). Required when ``process_count > 1``. Every
            process must call ``initialize_adapters`` with the same model structure.
        process_index: This process's index in ``[0, process_count)`` (the global rank).
        process_count: How many processes share the decompositions (the world size).
        device: Where to decompose and form the residuals; ``None``: where the weights are.

    Returns:
        ``{"count": layers initialised, "seconds": wall time, "decompose_seconds": time in this process's
        own decompositions, "decomposed": how many matrices this process decomposed, "weight_norms": ``‖W_0‖_F``
        by layer name, "max_reconstruction_error": max over layers of ‖W_base + delta − W‖_F / ‖W‖_F}``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if process_count > 1 and broadcast is None:
        raise ValueError(f"initialize_adapters with process_count={process_count} needs a broadcast(tensor, src)")
    start = time.perf_counter()
    pending = [(n, layer) for n, layer in adapter_layers(model) if not bool(layer.initialized)]
    meta = [n for n, layer in pending if layer.weight_matrix().is_meta]
    if meta:
        raise ValueError(f"cannot initialise adapters on meta tensors (load the weights first): {', '.join(meta)}")
    _check_finite({n: layer.weight_matrix() for n, layer in pending})
    uncalibrated = [n for n, layer in pending if layer.calibration_statistic and layer.calibration is None]
    if uncalibrated:
        method = dict(pending)[uncalibrated[0]].method
        raise ValueError(
            f"{method} is a data-aware init and {len(uncalibrated)} layer(s) have no calibration statistics (e.g. "
            f"'{uncalibrated[0]}'): fit with SVDInit(calibration_batches=N) and a train loader, or call "
            "lit_svd.calibration.calibrate(model, batches) instead of initialize_adapters"
        )
    groups: dict[tuple, list[AdapterLayer]] = defaultdict(list)
    for _, layer in pending:
        weight = layer.weight_matrix()
        work_device = torch.device(device) if device is not None else weight.device
        key = (layer.decomposition, tuple(weight.shape), layer.rank, layer.svd_method, work_device)
        groups[key].append(layer)

    plan: list[tuple[tuple, list[AdapterLayer], int]] = []  # (group key, chunk of layers, owner)
    for key, layers in groups.items():
        decomposition, shape = key[0], key[1]
        shared = decomposition in _DECOMPOSITIONS
        for owner in range(process_count if shared else 1):
            first, stop = _share(layers, owner, process_count) if shared else (0, len(layers))
            plan += [(key, chunk, owner) for chunk in stacked_chunks(layers[first:stop], shape)]
    # Pass 1: this process decomposes its own share of every group and forms those layers' adapters and
    # residuals right away (no communication, so all processes work at once). Pass 2: every share's
    # factors are broadcast from its owner, in the same order on every process, and the other processes
    # form those layers from the received, identical factors.
    own_factors: dict[int, tuple[torch.Tensor, ...]] = {}
    errors: list[torch.Tensor] = []
    weight_norms: dict[str, torch.Tensor] = {}

    def initialize_chunk(chunk: list[AdapterLayer], batched: tuple[torch.Tensor, ...] | None, device) -> None:
        for i, layer in enumerate(chunk):
            layer_factors = None if batched is None else tuple(t[i] for t in batched)
            error, weight_norms[layer.layer_name] = _initialize_on(layer, layer_factors, device)
            errors.append(error)

    decomposed = sum(len(chunk) for (key, chunk, owner) in plan if key[0] in _DECOMPOSITIONS and owner == process_index)
    decompose_start = time.perf_counter()
    for index, ((decomposition, _, rank, svd_method, work_device), chunk, owner) in enumerate(plan):
        if decomposition in _DECOMPOSITIONS and owner == process_index:
            own_factors[index] = _decompose(decomposition, chunk, rank, svd_method, compute_dtype, work_device)
    for factors_of_chunk in own_factors.values():  # CUDA runs asynchronously: time the work, not its launch
        if factors_of_chunk[0].is_cuda:
            torch.cuda.synchronize(factors_of_chunk[0].device)
    decompose_seconds = time.perf_counter() - decompose_start
    for index, batched in own_factors.items():
        (*_, work_device), chunk, _ = plan[index]
        initialize_chunk(chunk, batched, work_device)

    for index, ((decomposition, shape, rank, _, work_device), chunk, owner) in enumerate(plan):
        if decomposition not in _DECOMPOSITIONS:  # LoRA: init reads nothing; CorDA/EVA: their calibration;
            # LoftQ: SVDs of its own quantization error, inside init_from_base
            initialize_chunk(chunk, None, work_device)
            continue
        batched = own_factors.pop(index, None)
        if process_count > 1:
            if batched is None:
                batched = tuple(
                    torch.empty(s, dtype=compute_dtype, device=work_device)
                    for s in _factor_shapes(decomposition, len(chunk), shape, rank)
                )
            for t in batched:
                broadcast(t, owner)
        if owner != process_index:
            initialize_chunk(chunk, batched, work_device)
    max_error = max(torch.stack([e.cpu() for e in errors]).max().item(), 0.0) if errors else 0.0
    return {
        "count": len(pending),
        "seconds": time.perf_counter() - start,
        "decompose_seconds": decompose_seconds,
        "decomposed": decomposed,
        "max_reconstruction_error": max_error,
        "weight_norms": {name: norm.item() for name, norm in weight_norms.items()},
    }


def fits_on_device(module: torch.nn.Module, device: torch.device, share: float = 0.6) -> bool:
    """Whether ``module``'s parameters and buffers fit in ``share`` of ``device``'s free memory (CUDA only).

    The rest is left for the decompositions' work space and for the shards ``fully_shard`` copies out of
    the full tensors before it frees them.
    """
    if torch.device(device).type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return size <= share * free


def move_if_it_fits(module: torch.nn.Module, device: torch.device | str | None) -> bool:
    """Move an unsharded ``module`` onto ``device`` in one transfer when it fits (``fits_on_device``); say whether
    it moved. Work on the whole model then runs there (SVD init, residual rebuilds, exports) instead of each
    layer visiting the device from host memory."""
    if device is None or is_sharded(module) or not fits_on_device(module, torch.device(device)):
        return False
    module.to(device)
    return True


@contextlib.contextmanager
def _visiting(layer: AdapterLayer, device: torch.device | None) -> Iterator[None]:
    """Move ``layer`` (base weight and adapter tensors) to ``device`` for the block, then back home."""
    home = layer.initialized.device  # not weight_matrix(): a 4-bit base would be dequantized to ask
    if device is None or torch.device(device) == home:
        yield
        return
    layer.to(device)
    try:
        yield
    finally:
        layer.to(home)


def _initialize_on(layer: AdapterLayer, factors, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer.initialize(factors)`` on ``device``; returns its reconstruction error and ``‖W_0‖_F`` (0-dim
    tensors, so that initialising many layers does not wait for the device after each)."""
    with _visiting(layer, device):
        # Measured here because under FSDP this is the last time the layer's whole weight is in one place.
        weight_norm = torch.linalg.vector_norm(layer.weight_matrix().float())
        return layer.initialize_without_sync(factors), weight_norm


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear``/``Conv1D`` back.

    The result is an ordinary Hugging Face model: ``save_pretrained`` writes a normal checkpoint. A 4-bit
    (NF4) base becomes a full-precision layer holding ``deq(base) + delta`` in the base's original dtype.
    """
    for name, layer in list(adapter_layers(model)):
        if not bool(layer.initialized):
            raise ValueError(f"adapter '{name}' was never initialised; nothing meaningful to merge")
        if layer.quantized:
            plain = _full_precision_layer(layer)
        else:
            layer.merge()
            plain = layer.base_layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if hasattr(model, "lit_svd_config"):
        del model.lit_svd_config
    return model


@torch.no_grad()
def _full_precision_layer(layer: AdapterLayer) -> nn.Module:
    """A plain ``nn.Linear``/``Conv1D`` holding ``deq(base) + delta`` of a layer with a 4-bit base."""
    base = layer.base_layer
    merged = layer.merged_weight().to(base.dtype)
    device = merged.device
    if layer.is_conv1d:
        plain = Conv1D(layer.out_features, layer.in_features).to(device, base.dtype)
        plain.weight.copy_(merged.T)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device=device)
        plain = plain.to(base.dtype)
        plain.weight.copy_(merged)
    if base.bias is not None:
        plain.bias.copy_(base.bias)
    return plain.requires_grad_(False)


def _orthonormal_factors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The factors ``L_orth`` regularises (SORSA's ``U`` and ``V``), layer by layer."""
    for _, layer in adapter_layers(model):
        for factor_name in layer.orthonormal_names:
            yield getattr(layer, factor_name)


def orthonormal_regularizer(model: nn.Module) -> torch.Tensor:
    """SORSA's ``L_orth``: mean over adapted layers and factors of ``‖XᵀX − I_r‖_F`` (not squared).

    Factors of equal shape are stacked so the whole model costs a few batched matmuls. Returns a zero
    tensor when the model has no orthonormally regularised factors.
    """
    by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    device = None
    for factor in _orthonormal_factors(model):
        by_shape[(tuple(factor.shape), factor.dtype, factor.device)].append(factor)
        device = factor.device
    if not by_shape:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else device)
    errors = []
    for factors in by_shape.values():
        if isinstance(factors[0], DTensor):
            # FSDP shards each factor by rows: XᵀX is the sum of the shards' local Gram matrices.
            local = torch.stack([local_tensor(f) for f in factors]).float()
            gram = _SumOverRanks.apply(local.mT @ local, factors[0].device_mesh.get_group())
            errors.append(orthonormality_error_from_gram(gram))
        else:
            errors.append(orthonormality_error(torch.stack(factors).float()))
    return torch.cat(errors).mean()


def orthonormal_factor_groups(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> list[tuple[int | None, list[torch.Tensor]]]:
    """Every factor ``L_orth`` averages over, as ``(param_group_index, factors)``: the factors of an entry
    share a shape, dtype and device (they stack) and the ``optimizer`` param group that trains them
    (``None``: not trained by it)."""
    group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for factor in _orthonormal_factors(model):
        index = group_of.get(id(factor)) if factor.requires_grad else None
        groups[(index, tuple(factor.shape), factor.dtype, factor.device)].append(factor)
    return [(key[0], factors) for key, factors in groups.items()]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward.

    Every rank computes the same loss from the summed Gram matrix, so each rank's local term receives the
    loss's gradient unchanged; the shard's own gradient then follows locally. (DTensor's own
    ``full_tensor()`` would sum the identical gradients of all ranks in backward: world_size × too big.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded ``model``'s parameters (they are ``DTensor`` shards then)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of ``model`` (see module docstring), keyed ``<layer path>.<tensor>``."""
    state = {}
    for name, layer in adapter_layers(model):
        if layer.merged:
            raise ValueError(f"adapter '{name}' is merged; unmerge() before saving its state")
        for tensor_name in layer.adapter_tensor_names:
            state[f"{name}.{tensor_name}"] = getattr(layer, tensor_name).detach()
    return state


def load_adapter_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device | str | None = None
) -> None:
    """Load ``adapter_state_dict`` output into a model injected with the same config.

    The target model's base weights must be the original pretrained ones (adapters injected with
    ``initialize=False``), or already initialised with the very same init snapshot. Everything is
    validated before any tensor is written.

    Args:
        model: Model with injected adapters.
        state_dict: Adapter tensors by ``<layer path>.<tensor>``.
        device: Where residuals are rebuilt (each layer visits it); ``None``: where the weights are.
    """
    layers = dict(adapter_layers(model))
    if not layers:
        raise ValueError("model has no lit_svd adapters; call inject_adapters(model, config, initialize=False) first")
    expected = {f"{n}.{t}": getattr(layer, t) for n, layer in layers.items() for t in layer.adapter_tensor_names}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} adapter tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {', '.join(unexpected[:3])}")
    for key in sorted(set(expected) & set(state_dict)):
        saved, target = state_dict[key], expected[key]
        if tuple(saved.shape) != tuple(target.shape):
            problems.append(
                f"shape mismatch for '{key}': checkpoint {tuple(saved.shape)} vs model "
                f"{tuple(target.shape)} (different rank or model?)"
            )
        elif saved.is_floating_point() != target.is_floating_point():
            problems.append(f"dtype mismatch for '{key}': checkpoint {saved.dtype} vs model {target.dtype}")
        elif saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            problems.append(f"non-finite values in '{key}'")
    if problems:
        methods = {layer.method for layer in layers.values()}
        raise ValueError(
            f"adapter state dict does not fit this model (method {'/'.join(sorted(methods))}, rank "
            f"{next(iter(layers.values())).rank}): " + "; ".join(problems)
        )
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"adapter '{name}' is merged; unmerge() before loading a state dict")
        if bool(layer.initialized) and layer.decomposition is not None:
            same = all(
                torch.equal(getattr(layer, f"init_{t}"), state_dict[f"{name}.init_{t}"].to(getattr(layer, t).device))
                for t in layer.trainable_names
            )
            if not same:
                raise ValueError(
                    f"layer '{name}' was already initialised from other factors, so its base weight is no "
                    "longer the original; load adapters onto a model injected with initialize=False"
                )
    with torch.no_grad():
        for name, layer in layers.items():
            was_initialized = bool(layer.initialized)
            for tensor_name in layer.adapter_tensor_names:
                getattr(layer, tensor_name).copy_(state_dict[f"{name}.{tensor_name}"])
            if bool(layer.initialized) and not was_initialized:
                with _visiting(layer, device):
                    layer.rebuild_residual()
