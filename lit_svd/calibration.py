"""The calibration stage of data-aware inits (CorDA, EVA, LoRA-GA): layer statistics from a few batches.

```
batches ──> frozen model (adapters bypassed) ──> forward pre-hooks on the adapted layers
        ──> per-layer float32 sums on the model's device ──> all_reduce (sum) over ranks
        ──> per-layer init factors (small) ──> initialize_adapters ──> statistics freed
```

What each method accumulates per adapted layer with input ``x`` (tokens × n), padding left out:

- ``"corda"``: ``Σ_sequences X̃ᵀ X̃`` with ``X̃ = X / |max X|`` per sequence (PEFT's normalisation), divided by
  the number of sequences: CorDA's covariance ``C`` (n×n), then ``linalg.corda_factors(W, C, r, mode)``;
- ``"eva"``: ``Σ xᵀx`` (n×n), ``Σ x`` and the token count over tokens that carry a label (PEFT's default
  label mask), then the exact centred covariance and its top principal directions
  (``linalg.pca_components``), and EVA's rank redistribution over all layers;
- ``"gradient"`` (LoRA-GA): the loss is back-propagated (to the activations only: no weight gradient is
  formed by autograd) and a hook on each adapted layer's output adds ``gᵀ x`` — the batch's gradient of the
  loss with respect to ``W`` (m×n) — to a float32 sum; divided by the number of batches, then
  ``linalg.loraga_factors``.

Memory: the statistics live in float32 on the model's device, ``4 n²`` bytes per adapted layer (a
Llama-2-7B layer set q,k,v,o,gate,up,down: 6·4096² + 11008² floats ≈ 0.87 GB per decoder layer, 28 GB for
all 32); LoRA-GA's gradient sums take ``4 m n`` bytes per layer (the float32 size of the adapted weights:
26 GB for all of a 7B model's). ``max_statistics_bytes`` caps them: the layers are split, in module order,
into groups whose statistics fit, and the calibration batches run once per group (more forward passes, bounded memory).
Each group's statistics become its small init factors right after its pass and are freed. Nothing here
keeps state between calls: two fits never share statistics.

Determinism: for a given batch list (and order), sums run in a fixed order on one device, so the
result is reproducible; under DDP every rank ends with the same all-reduced sums, hence identical factors.
Nothing here knows about Lightning (``lit_svd.callbacks.SVDInit`` calls ``calibrate`` inside ``fit``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lit_svd.adapters import AdapterLayer
from lit_svd.inject import adapter_layers, initialize_adapters
from lit_svd.linalg import corda_factors, loraga_factors, pca_components
from lit_svd.losses import IGNORE_INDEX

__all__ = ["calibrate", "statistics_bytes"]

Batch = Mapping[str, Any]


def statistics_bytes(layer: AdapterLayer) -> int:
    """Bytes of float32 statistics the calibration stage holds for ``layer`` while its group runs."""
    m, n = layer.out_features, layer.in_features
    if layer.calibration_statistic == "gradient":
        return 4 * m * n
    return 4 * (n * n + n) if layer.calibration_statistic else 0


def _default_forward(model: nn.Module) -> Callable[[Batch], Any]:
    def forward(batch: Batch) -> Any:
        labels = batch.get("labels", batch["input_ids"])  # the LM loss LoRA-GA differentiates
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)

    return forward


def _loss(output: Any) -> torch.Tensor:
    loss = output if isinstance(output, torch.Tensor) else getattr(output, "loss", None)
    if loss is None or loss.dim() != 0:
        raise ValueError("calibration by gradients (loraga) needs forward(batch) to return the scalar loss")
    return loss


@contextlib.contextmanager
def _activations_require_grad(model: nn.Module) -> Iterator[None]:
    """Make the input embeddings' output require grad, so the loss back-propagates to every layer's output
    while no frozen weight gets a gradient (what ``enable_input_require_grads`` does in transformers)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError("calibration by gradients (loraga) needs a model with get_input_embeddings()")
    handle = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    try:
        with torch.enable_grad():
            yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _base_model_only(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the original base model: every uninitialised adapter is skipped (its tensors are not
    set yet; ``torch.empty`` may hold NaN), by marking it merged — its base weight is still the original W."""
    skipped = [layer for _, layer in adapter_layers(model) if not bool(layer.initialized) and not layer.merged]
    was_training = model.training
    for layer in skipped:
        layer.merged = True
    model.eval()  # dropout off: the statistics describe the deterministic model
    try:
        yield
    finally:
        for layer in skipped:
            layer.merged = False
        model.train(was_training)


class _LayerStatistics:
    """Float32 sums for one layer; ``__call__`` is its forward pre-hook, ``after_forward`` (gradients) its
    forward hook."""

    def __init__(self, layer: AdapterLayer, masks: dict[str, torch.Tensor]) -> None:
        m, n, device = layer.out_features, layer.in_features, layer.weight_matrix().device
        self.kind = layer.calibration_statistic
        self.masks = masks  # the current batch's token masks, set by the runner before each forward
        gradient = self.kind == "gradient"
        self.outer = torch.zeros(m if gradient else n, n, dtype=torch.float32, device=device)
        self.total = torch.zeros(0 if gradient else n, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.name = layer.layer_name

    def register(self, layer: AdapterLayer) -> torch.utils.hooks.RemovableHandle:
        if self.kind == "gradient":
            return layer.register_forward_hook(self.after_forward)
        return layer.register_forward_pre_hook(self)

    def after_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # dL/dW = Σ_tokens g xᵀ with g = dL/dy: accumulated when the output's gradient arrives in backward.
        x = args[0].detach()
        self.count += 1

        def accumulate(g: torch.Tensor) -> None:
            self.outer.addmm_(g.reshape(-1, g.shape[-1]).float().T, x.reshape(-1, x.shape[-1]).float())

        if output.requires_grad:
            output.register_hook(accumulate)

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        mask = self.masks[self.kind]
        if x.shape[:-1] != mask.shape:
            raise ValueError(
                f"calibration: layer '{self.name}' got input of shape {tuple(x.shape)}, which does not match the "
                f"batch's tokens {tuple(mask.shape)}; calibrate with (batch, sequence) input_ids"
            )
        x = x.float()
        if self.kind == "corda":
            rows = mask.any(-1)
            x, mask = x[rows], mask[rows]
            # PEFT divides each sequence's inputs by |max| (not the max of |x|) before XᵀX; kept for parity.
            peak = x.masked_fill(~mask[..., None], float("-inf")).amax(dim=(-2, -1)).abs()
            tokens = (x / peak[:, None, None])[mask]
            self.count += rows.sum()
        else:
            tokens = x[mask]
            self.total += tokens.sum(0)
            self.count += tokens.shape[0]
        self.outer.addmm_(tokens.T, tokens)

    def tensors(self) -> list[torch.Tensor]:
        return [self.outer, self.total, self.count]


def _token_masks(batch: Batch) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"]
    tokens = batch.get("attention_mask")
    tokens = torch.ones_like(ids, dtype=torch.bool) if tokens is None else tokens.bool()
    labels = batch.get("labels")
    labelled = tokens if labels is None else tokens & (labels != IGNORE_INDEX)
    return {"corda": tokens, "eva": labelled}


def _groups(layers: list[AdapterLayer], max_bytes: int | None) -> list[list[AdapterLayer]]:
    """Consecutive layers whose statistics fit in ``max_bytes`` together (at least one layer each)."""
    if max_bytes is None:
        return [layers]
    groups: list[list[AdapterLayer]] = [[]]
    used = 0
    for layer in layers:
        size = statistics_bytes(layer)
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    return groups


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _eva_ranks(ratios: list[torch.Tensor], budget: int) -> list[int]:
    """EVA's redistribution: the ``budget`` components with the largest explained-variance ratio over all
    layers (ties broken by layer order, then component order), counted per layer."""
    values = torch.cat(ratios).double().cpu()
    owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(ratios)])
    order = torch.sort(-values, stable=True).indices[:budget]
    return torch.bincount(owner[order], minlength=len(ratios)).tolist()


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    forward: Callable[[Batch], Any] | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    max_statistics_bytes: int | None = None,
    **initialize_kwargs: Any,
) -> dict[str, Any]:
    """Collect the calibration statistics of every pending data-aware adapter, then initialise all adapters.

    Args:
        model: Model with injected, uninitialised adapters (``inject_adapters(..., initialize=False)``) and
            ``model.lit_svd_config`` (set by ``inject_adapters``).
        batches: The calibration batches, each a mapping with ``input_ids`` (B, T) and optionally
            ``attention_mask`` (B, T) and ``labels`` (B, T); moved to the model's device.
        forward: ``forward(batch)`` runs the model on a batch (default: ``model(input_ids, attention_mask)``).
        all_reduce: In-place sum of a tensor over all processes (e.g. ``torch.distributed.all_reduce``); each
            process passes its own batches and all end with the statistics of all of them.
        max_statistics_bytes: Cap on the statistics held at once (``statistics_bytes`` per layer); ``None``:
            all layers in one pass.
        **initialize_kwargs: Passed to ``initialize_adapters`` (``compute_dtype``, ``broadcast``, …).

    Returns:
        ``initialize_adapters``' report plus ``calibration_seconds``, ``calibration_batches``,
        ``calibration_passes``, ``calibration_peak_bytes`` and ``eva_ranks`` (name → assigned rank, EVA only).
    """
    start = time.perf_counter()
    layers = [
        layer for _, layer in adapter_layers(model) if layer.calibration_statistic and not bool(layer.initialized)
    ]
    batches = list(batches)
    report: dict[str, Any] = {"calibration_batches": len(batches), "calibration_passes": 0}
    report["calibration_peak_bytes"] = 0
    if layers:
        if not batches:
            raise ValueError(f"calibration of {layers[0].method} got 0 batches; give it at least one batch")
        too_small = [
            f"'{layer.layer_name}' ({layer.out_features}×{layer.in_features})"
            for layer in layers
            if layer.calibration_statistic == "gradient" and 2 * layer.rank > min(layer.out_features, layer.in_features)
        ]
        if too_small:  # checked before any batch runs
            raise ValueError(
                f"loraga takes 2·rank = {2 * layers[0].rank} singular vectors of each gradient; too many for layer(s) "
                + ", ".join(too_small)
            )
        config = getattr(model, "lit_svd_config", None)
        if config is None:
            raise ValueError("calibrate needs model.lit_svd_config: inject adapters with lit_svd.inject_adapters")
        run = forward or _default_forward(model)
        device = layers[0].weight_matrix().device
        compute_dtype = initialize_kwargs.get("compute_dtype", torch.float32)
        payloads: dict[AdapterLayer, tuple[torch.Tensor, ...]] = {}
        masks: dict[str, torch.Tensor] = {}
        for group in _groups(layers, max_statistics_bytes):
            statistics = {layer: _LayerStatistics(layer, masks) for layer in group}
            report["calibration_peak_bytes"] = max(
                report["calibration_peak_bytes"], sum(statistics_bytes(layer) for layer in group)
            )
            handles = [stat.register(layer) for layer, stat in statistics.items()]
            gradients = any(stat.kind == "gradient" for stat in statistics.values())
            try:
                with (
                    _base_model_only(model),
                    _activations_require_grad(model) if gradients else contextlib.nullcontext(),
                ):
                    for batch in batches:
                        batch = _to_device(batch, device)
                        masks.update(_token_masks(batch))
                        output = run(batch)
                        if gradients:
                            _loss(output).backward()
                        del output
            finally:
                for handle in handles:
                    handle.remove()
                masks.clear()
            report["calibration_passes"] += 1
            for layer, stat in statistics.items():
                if all_reduce is not None:
                    for tensor in stat.tensors():
                        all_reduce(tensor)
                payloads[layer] = _finalize(layer, stat, config.corda_mode, compute_dtype)
            del statistics  # the n×n sums go before the next group's are allocated
        eva = [layer for layer in layers if layer.calibration_statistic == "eva"]
        if eva:
            ranks = _eva_ranks([payloads[layer][1] for layer in eva], config.rank * len(eva))
            for layer, k in zip(eva, ranks, strict=True):
                payloads[layer] = (payloads[layer][0][:, :k],)
            report["eva_ranks"] = {layer.layer_name: k for layer, k in zip(eva, ranks, strict=True)}
        for layer, payload in payloads.items():
            layer.calibration = payload
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    report["calibration_seconds"] = time.perf_counter() - start
    try:
        report |= initialize_adapters(model, **initialize_kwargs)
    finally:
        for layer in layers:  # also after a failed init: no statistics outlive this call
            layer.calibration = None
    return report


def _finalize(layer: AdapterLayer, stat: _LayerStatistics, mode: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The small per-layer init factors from the reduced sums (see the module docstring)."""
    count = stat.count.item()
    if count == 0:
        raise ValueError(
            f"calibration saw no tokens for layer '{layer.layer_name}' ({layer.method}): every calibration token "
            "was padding" + (" or label-masked (labels == -100)" if stat.kind == "eva" else "")
        )
    if stat.kind == "corda":
        return corda_factors(layer.weight_matrix(), stat.outer / count, layer.rank, mode, dtype=dtype)
    if stat.kind == "gradient":
        return loraga_factors(stat.outer / count, layer.rank, dtype=dtype)
    if count < 2:
        raise ValueError(f"calibration saw 1 token for layer '{layer.layer_name}' (eva); it needs at least 2")
    mean = stat.total.double() / count
    covariance = (stat.outer.double() - count * torch.outer(mean, mean)) / (count - 1)
    return pca_components(covariance, layer.rank)
