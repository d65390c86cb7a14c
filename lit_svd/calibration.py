"""The calibration stage of data-aware inits (CorDA, EVA, LoRA-GA): layer statistics from a few batches.

```
batches ──> frozen model (adapters bypassed) ──> forward pre-hooks on the adapted layers
        ──> float32 sums per layer input on the model's device ──> all_reduce (sum) over ranks
        ──> per-layer init factors (batched, small) ──> initialize_adapters ──> statistics freed
```

What each method accumulates per adapted layer with input ``x`` (tokens × n), padding left out:

- ``"corda"``: ``Σ_sequences X̃ᵀ X̃`` with ``X̃ = X / |max X|`` per sequence (PEFT's normalisation), divided by
  the number of sequences: CorDA's covariance ``C`` (n×n), then ``linalg.corda_factors(W, C, r, mode)``;
- ``"eva"``: ``Σ xᵀx`` (n×n), ``Σ x`` and the token count over tokens that carry a label (PEFT's default
  label mask), then the exact centred covariance and its top principal directions
  (``linalg.pca_components``), and EVA's rank redistribution over all layers;
- ``"gradient"`` (LoRA-GA): the loss is back-propagated (to the activations only: no weight gradient is
  formed by autograd) and a hook on each adapted layer's output adds ``gᵀ x`` over the real tokens — the
  batch's gradient of the loss with respect to ``W`` (m×n); padding, never a loss target, has ``g = 0`` — to a
  float32 sum; divided by the number of batches, then
  ``linalg.loraga_factors``.

Layers fed the very same input tensor (q/k/v_proj; gate/up_proj) share one CorDA/EVA sum: one n×n GEMM
per batch and one buffer for the three, bitwise equal to their own (``_Collector`` checks it on every batch).
Padded batches run as one packed row each (``pack_batches``; ``lit_svd.data.pack_padded_batch``): the same
tokens and loss, no FLOPs on padding; the statistics read the same positions, a packed row's sequences keep
their own CorDA scaling, and its padding sequence is no input. A bf16 model's input sums are bf16 tensor-core
GEMMs with float32 output (exact products; CorDA's ``x/p²`` as three bf16 parts, ``_bf16_parts``).

Memory: the statistics live in float32 on the model's device, ``4 n²`` bytes per distinct layer input (a
Llama-2-7B layer set q,k,v,o,gate,up,down reads 4 inputs: 3·4096² + 11008² floats ≈ 0.69 GB per decoder layer,
22 GB for all 32; 28 GB if each layer kept its own); LoRA-GA's gradient sums take ``4 m n`` bytes per layer
(the float32 size of the adapted weights: 26 GB for all of a 7B model's). ``max_statistics_bytes`` caps them:
the layers are split, in module order, into groups whose statistics fit, and the calibration batches run once
per group (more forward passes, bounded memory). Each group's statistics become its small init factors right
after its pass and are freed. Nothing here keeps state between calls: two fits never share statistics.

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
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lit_svd.adapters import AdapterLayer
from lit_svd.attention import supports_packing, varying_shape_attention
from lit_svd.data import pack_padded_batch
from lit_svd.inject import adapter_layers, initialize_adapters, stacked_chunks
from lit_svd.linalg import corda_factors, damped_inverse, loraga_factors, pca_components
from lit_svd.losses import IGNORE_INDEX, causal_lm_batch_loss

__all__ = ["calibrate", "statistics_bytes"]

Batch = Mapping[str, Any]


def statistics_bytes(layer: AdapterLayer) -> int:
    """Bytes of float32 statistics the calibration stage holds for ``layer`` while its group runs (an upper
    bound: layers that read one input share one statistic)."""
    m, n = layer.out_features, layer.in_features
    if layer.calibration_statistic == "gradient":
        return 4 * m * n
    return 4 * (n * n + n) if layer.calibration_statistic else 0


def _default_forward(model: nn.Module) -> Callable[[Batch], Any]:
    def forward(batch: Batch) -> Any:
        labels = batch.get("labels")  # the LM loss LoRA-GA differentiates; padding is never a target
        if labels is None:
            mask = batch.get("attention_mask")
            labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
        if isinstance(model, PreTrainedModel):
            # Padded or packed; the head runs on labelled positions only (no (B, T, V) float32 logits).
            return causal_lm_batch_loss(model, {**batch, "labels": labels})
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


class _NotShared(Exception):
    """Raised by the hooks when layers that shared an input on the first batch stop sharing it."""


class _Sums:
    """Float32 sums of one statistic: one layer's gradient (LoRA-GA), or the inputs of every layer that reads
    the very same input tensor (CorDA, EVA: q/k/v_proj read one tensor, gate/up_proj another)."""

    def __init__(self, layer: AdapterLayer) -> None:
        m, n, device = layer.out_features, layer.in_features, layer.weight_matrix().device
        self.kind = layer.calibration_statistic
        gradient = self.kind == "gradient"
        self.outer = torch.zeros(m if gradient else n, n, dtype=torch.float32, device=device)
        self.total = torch.zeros(0 if gradient else n, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.layers = [layer]  # the first one accumulates; the others were checked to read the same tensor
        self.steps: list[int] = []  # this batch's accumulations, by the collector's step number

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.outer, self.total))

    def tensors(self) -> list[torch.Tensor]:
        return [self.outer, self.total, self.count]

    def add_inputs(self, x: torch.Tensor, tokens: _Tokens) -> None:
        rows = x.reshape(-1, x.shape[-1]).index_select(0, tokens.index)
        exact = _tensor_core_sums(rows)  # a bf16 model on a GPU: bf16 GEMMs with float32 sums (see below)
        selected = rows if exact else rows.float()
        if self.kind == "corda":
            # PEFT divides each sequence's inputs by |max| (not the max of |x|) before XᵀX; kept for parity.
            # The max over each sequence's real tokens, as a scatter over the tokens already selected.
            peak = torch.full((tokens.slots,), float("-inf"), dtype=torch.float32, device=rows.device)
            peak = peak.scatter_reduce(0, tokens.sequence, selected.amax(-1).float(), "amax").abs()
            self.count += tokens.sequences
            if not exact:
                selected = selected / peak[tokens.sequence, None]
                self.outer.addmm_(selected.T, selected)
                return
            # Σ (x/p)ᵀ(x/p) = Σ xᵀ (x/p²): x stays bf16 (exact), x/p² (float32) is split into three bf16 parts
            # whose sum holds its 24 bits, so three bf16 GEMMs with float32 output give the float32 GEMM's sum.
            for part in _bf16_parts(rows.float() / peak[tokens.sequence, None].square()):
                _add_product(self.outer, rows, part)
            return
        self.total += selected.sum(0, dtype=torch.float32)
        self.count += tokens.count
        _add_product(self.outer, selected, selected)


def _tensor_core_sums(rows: torch.Tensor) -> bool:
    """Whether ``rows``' sums go to bf16 tensor-core GEMMs with float32 output. On the CPU (e.g. a model still on
    the host before FSDP shards it) ``_add_product`` multiplies float32 copies anyway, where CorDA's three
    bf16 parts would only triple the work."""
    return rows.is_cuda and rows.dtype == torch.bfloat16


def _bf16_parts(values: torch.Tensor) -> list[torch.Tensor]:
    """Three bf16 tensors whose float32 sum is ``values`` (float32) to within float32 rounding: each takes the
    leading 8 significant bits of what the previous ones left (``values − Σ parts`` is exact in float32)."""
    parts, rest = [], values
    for _ in range(3):
        parts.append(rest.to(torch.bfloat16))
        rest = rest - parts[-1].float()
    return parts


class _Tokens:
    """One batch's real tokens for one statistic: a mask (B, T), their flat indices, and their sequences.

    The indices come from one ``nonzero`` per batch (one host synchronisation), so the hooks select tokens
    with ``index_select`` without synchronising: padding never enters the float32 GEMMs. ``sequence`` gives
    each selected token's sequence, a slot in ``0 … slots − 1`` (a padded batch's row; in a packed row, the
    sequence that ``cu_seq_lens`` puts it in)."""

    def __init__(self, mask: torch.Tensor, sequence: torch.Tensor, slots: int) -> None:
        self.mask = mask
        self.index = mask.reshape(-1).nonzero().squeeze(-1)
        self.count = self.index.numel()
        self.sequence = sequence.reshape(-1).index_select(0, self.index)
        self.slots = slots
        seen = torch.zeros(slots, dtype=torch.float64, device=mask.device)
        self.sequences = seen.index_fill_(0, self.sequence, 1.0).sum()


class _Collector:
    """The hooks of one pass over the calibration batches and the sums they fill.

    CorDA and EVA sum ``xᵀx`` over a layer's input ``x``; layers fed the very same tensor (same object and
    in-place version, seen one right after the other) share one sum, so q/k/v_proj cost one n×n GEMM and one
    n×n buffer instead of three. Who shares with whom is fixed on the first batch and checked on every batch
    after it (each follower must read exactly the tensors its leader summed); if that ever fails the pass
    is run again without sharing (``share=False``), so the statistics are always each layer's own.
    """

    def __init__(self, layers: list[AdapterLayer], share: bool) -> None:
        self.share = share
        self.sums: dict[AdapterLayer, _Sums] = {}
        for layer in layers:
            if not share or layer.calibration_statistic == "gradient":
                self.sums[layer] = _Sums(layer)
        self.tokens: dict[str, _Tokens] = {}
        self.batch, self.step = 0, 0
        self.last: tuple[torch.Tensor, int, _Sums, int] | None = None  # the input summed last, to compare with
        self.matched: dict[AdapterLayer, list[int]] = {}

    def register(self, layer: AdapterLayer) -> torch.utils.hooks.RemovableHandle:
        if layer.calibration_statistic == "gradient":
            return layer.register_forward_hook(self.after_forward)
        return layer.register_forward_pre_hook(self.before_forward)

    def start_batch(self, masks: dict[str, torch.Tensor], sequence: torch.Tensor, slots: int) -> None:
        kinds = {sums.kind for sums in self.sums.values()} | ({"corda", "eva"} if self.share else set())
        self.tokens = {kind: _Tokens(mask, sequence, slots) for kind, mask in masks.items() if kind in kinds}

    def end_batch(self) -> None:
        for layer, sums in self.sums.items():
            if sums.layers[0] is not layer and self.matched.get(layer, []) != sums.steps:
                raise _NotShared(layer.layer_name)
        for sums in self.sums.values():
            sums.steps.clear()
        self.matched.clear()
        self.last = None  # drop the reference to the last input
        self.batch += 1

    def after_forward(self, module: AdapterLayer, args: tuple, output: torch.Tensor) -> None:
        # dL/dW = Σ_tokens g xᵀ with g = dL/dy: accumulated when the output's gradient arrives in backward.
        # Padding positions are left out: nothing downstream reads them, so their g is exactly 0.
        x = args[0].detach()
        index = self._tokens_of(module, x).index
        x = x.reshape(-1, x.shape[-1]).index_select(0, index)
        sums = self.sums[module]
        sums.count += 1

        def accumulate(g: torch.Tensor) -> None:
            _add_product(sums.outer, g.reshape(-1, g.shape[-1]).index_select(0, index), x)

        if output.requires_grad:
            output.register_hook(accumulate)

    def _tokens_of(self, module: AdapterLayer, x: torch.Tensor) -> _Tokens:
        tokens = self.tokens[module.calibration_statistic]
        if x.shape[:-1] != tokens.mask.shape:
            raise ValueError(
                f"calibration: layer '{module.layer_name}' got input of shape {tuple(x.shape)}, which does not match "
                f"the batch's tokens {tuple(tokens.mask.shape)}; calibrate with (batch, sequence) input_ids"
            )
        return tokens

    @torch.no_grad()
    def before_forward(self, module: AdapterLayer, args: tuple) -> None:
        x, kind = args[0], module.calibration_statistic
        tokens = self._tokens_of(module, x)
        last = self.last
        same = last is not None and last[0] is x and last[1] == x._version and last[2].kind == kind
        sums = self.sums.get(module)
        if sums is None:  # first call of this layer (sharing on): join the sums of the tensor just summed
            if same and self.batch == 0:
                sums = last[2]
                sums.layers.append(module)
            else:
                sums = _Sums(module)
            self.sums[module] = sums
        if sums.layers[0] is module:
            sums.add_inputs(x, tokens)
            self.step += 1
            sums.steps.append(self.step)
            self.last = (x, x._version, sums, self.step)
            return
        matched = self.matched.setdefault(module, [])
        if not (same and last[2] is sums and (not matched or matched[-1] < last[3])):
            raise _NotShared(module.layer_name)
        matched.append(last[3])

    def distinct(self) -> list[_Sums]:
        """Each sum once, in the order of its first layer (the same on every rank when the plans agree)."""
        return list({id(sums): sums for sums in self.sums.values()}.values())

    def plan(self, layers: list[AdapterLayer]) -> torch.Tensor:
        """Per layer, the position of the layer whose sums it uses; the ranks must agree on it."""
        position = {layer: i for i, layer in enumerate(layers)}
        return torch.tensor([position[self.sums[layer].layers[0]] for layer in layers], dtype=torch.float64)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += aᵀ b`` in float32 for ``a`` (k, m), ``b`` (k, n).

    bf16/fp16 CUDA inputs go to a tensor-core GEMM with float32 output (products of bf16 numbers are exact in
    float32, so this rounds like the float32 GEMM of their float32 copies), without the two float32 copies."""
    if out.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(out, a.T, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError):  # a torch without the out_dtype overload
            pass
    out.addmm_(a.float().T, b.float())


def _statistic_tokens(batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Per statistic kind, which positions of ``input_ids`` it reads; each position's sequence; how many
    sequence slots. Padded batches: the attention mask (EVA: and a label), one sequence per row. Packed rows
    (``cu_seq_lens``): every position but the trailing padding sequence (``padding_tokens``)."""
    ids = batch["input_ids"]
    if "cu_seq_lens" in batch:
        boundaries = batch["cu_seq_lens"].to(ids.device).long()
        slots = boundaries.numel() - 1
        slot = torch.arange(slots, device=ids.device)
        sequence = torch.repeat_interleave(slot, boundaries.diff(), output_size=ids.shape[-1])[None]
        tokens = torch.ones_like(ids, dtype=torch.bool)
        padding = int(batch.get("padding_tokens", 0))
        if padding:
            tokens[..., -padding:] = False
    else:
        slots = ids.shape[0]
        sequence = torch.arange(slots, device=ids.device)[:, None].expand_as(ids)
        mask = batch.get("attention_mask")
        tokens = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    labelled = tokens if labels is None else tokens & (labels != IGNORE_INDEX)
    return {"corda": tokens, "eva": labelled, "gradient": tokens}, sequence, slots


def _prepared(batch: Batch, pack: bool) -> tuple[Batch, dict[str, torch.Tensor], torch.Tensor, int]:
    """The batch to run (packed if ``pack`` and padded) and its ``_statistic_tokens``, read from the batch as
    given: a packed batch's statistics are those of the padded one, token for token."""
    masks, sequence, slots = _statistic_tokens(batch)
    real = masks["corda"]
    if not pack or "cu_seq_lens" in batch or not bool(real.any()):  # all padding: nothing to pack
        return batch, masks, sequence, slots
    packed_masks = {kind: mask[real][None] for kind, mask in masks.items()}
    return pack_padded_batch(batch), packed_masks, sequence[real][None], slots


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


def _run_pass(
    model: nn.Module,
    group: list[AdapterLayer],
    batches: list[Batch],
    run: Callable[[Batch], Any],
    device: torch.device,
    all_reduce: Callable[[torch.Tensor], None] | None,
    pack: bool,
    progress: str | None = None,
) -> _Collector:
    """All batches through the model once with ``group``'s hooks; again without shared inputs if sharing
    broke on this rank (``_NotShared``) or the ranks' sharing plans differ (then every rank runs again)."""
    gradients = any(layer.calibration_statistic == "gradient" for layer in group)
    passes = 0
    for share in (True, False):
        collector = _Collector(group, share)
        handles = [collector.register(layer) for layer in group]
        passes += 1
        try:
            with (
                _base_model_only(model),
                varying_shape_attention(),
                _activations_require_grad(model) if gradients else contextlib.nullcontext(),
            ):
                for batch in tqdm(batches, desc=progress, unit="batch", disable=progress is None):
                    batch, masks, sequence, slots = _prepared(_to_device(batch, device), pack)
                    collector.start_batch(masks, sequence, slots)
                    output = run(batch)
                    if gradients:
                        _loss(output).backward()
                    del output
                    collector.end_batch()
        except _NotShared:
            continue  # this rank's sums are incomplete: run again, each layer on its own
        finally:
            for handle in handles:
                handle.remove()
            collector.tokens.clear()
        for layer in group:  # never called: empty sums, reported as such by _finalize
            collector.sums.setdefault(layer, _Sums(layer))
        if not share or all_reduce is None or _plans_agree(collector.plan(group).to(device), all_reduce):
            break
    collector.passes = passes
    return collector


def _plans_agree(plan: torch.Tensor, all_reduce: Callable[[torch.Tensor], None]) -> bool:
    """Whether every rank has the same sharing plan: ``world · Σ p² == (Σ p)²`` per entry only if all equal."""
    summed = torch.cat([torch.ones(1, dtype=plan.dtype, device=plan.device), plan, plan * plan])
    all_reduce(summed)
    world, total, squares = summed[0], summed[1 : 1 + len(plan)], summed[1 + len(plan) :]
    return bool((world * squares == total * total).all())


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    forward: Callable[[Batch], Any] | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    max_statistics_bytes: int | None = None,
    pack_batches: bool | None = None,
    progress: bool = False,
    **initialize_kwargs: Any,
) -> dict[str, Any]:
    """Collect the calibration statistics of every pending data-aware adapter, then initialise all adapters.

    Args:
        model: Model with injected, uninitialised adapters (``inject_adapters(..., initialize=False)``) and
            ``model.lit_svd_config`` (set by ``inject_adapters``).
        batches: The calibration batches, each a mapping with ``input_ids`` (B, T) and optionally
            ``attention_mask`` (B, T) and ``labels`` (B, T), or a packed row (``cu_seq_lens``, as
            ``InstructionCollator(pack=True)`` makes); moved to the model's device.
        forward: ``forward(batch)`` runs the model on a batch and returns the loss LoRA-GA differentiates
            (default: for a transformers model the masked causal-LM loss of ``lit_svd.losses.causal_lm_batch_loss``,
            else ``model(input_ids, attention_mask, labels)``; ``labels`` default to the input ids, padding left out).
        all_reduce: In-place sum of a tensor over all processes (e.g. ``torch.distributed.all_reduce``); each
            process passes its own batches and all end with the statistics of all of them.
        max_statistics_bytes: Cap on the statistics held at once (``statistics_bytes`` per layer); ``None``:
            all layers in one pass.
        pack_batches: Run each padded batch as one packed row (``lit_svd.data.pack_padded_batch``): the same
            tokens, statistics and loss without the FLOPs of padding (GSM8K batches of 8: 30 % of the
            positions). ``forward`` must accept packed batches (``LitSVDAdapter.compute_loss`` does; ``SVDInit``
            passes it). ``None``: pack when ``forward`` is the default and the model supports packing
            (``lit_svd.attention.supports_packing``). Batches that arrive packed are run as they are.
        progress: Show a progress bar over the batches of each pass (``SVDInit`` shows it on rank 0).
        **initialize_kwargs: Passed to ``initialize_adapters`` (``compute_dtype``, ``broadcast``, …).

    Returns:
        ``initialize_adapters``' report plus ``calibration_seconds``, ``calibration_batches``,
        ``calibration_passes``, ``calibration_peak_bytes`` (statistics held at once),
        ``calibration_shared_layers`` (layers that used another layer's input statistic),
        ``calibration_packed`` (padded batches ran as packed rows), the stage times
        ``calibration_pass_seconds`` (batches through the model, statistics summed) and
        ``calibration_finalize_seconds`` (statistics → init factors), and ``eva_ranks`` (name → assigned rank,
        EVA only).
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
        if pack_batches is None:
            pack_batches = forward is None and supports_packing(model)
        elif pack_batches and not supports_packing(model):
            raise ValueError(
                f"pack_batches=True, but {type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so its batches cannot be packed; pass pack_batches=False"
            )
        report["calibration_packed"] = bool(pack_batches)
        device = layers[0].weight_matrix().device
        compute_dtype = initialize_kwargs.get("compute_dtype", torch.float32)
        payloads: dict[AdapterLayer, tuple[torch.Tensor, ...]] = {}
        report["calibration_shared_layers"] = 0
        report["calibration_pass_seconds"] = report["calibration_finalize_seconds"] = 0.0
        groups = _groups(layers, max_statistics_bytes)
        for number, group in enumerate(groups, 1):
            description = f"Calibrating {layers[0].method}" + (
                f" (layer group {number}/{len(groups)})" if len(groups) > 1 else ""
            )
            stage = _synchronized_clock(device)
            collector = _run_pass(
                model, group, batches, run, device, all_reduce, pack_batches, description if progress else None
            )
            report["calibration_pass_seconds"] += _synchronized_clock(device) - stage
            report["calibration_passes"] += collector.passes
            distinct = collector.distinct()
            report["calibration_peak_bytes"] = max(
                report["calibration_peak_bytes"], sum(sums.nbytes() for sums in distinct)
            )
            report["calibration_shared_layers"] += len(group) - len(distinct)
            if all_reduce is not None:
                for sums in distinct:
                    for tensor in sums.tensors():
                        all_reduce(tensor)
            stage = _synchronized_clock(device)
            payloads |= _finalize(distinct, config.corda_mode, compute_dtype)
            report["calibration_finalize_seconds"] += _synchronized_clock(device) - stage
            del collector, distinct  # the n×n sums go before the next group's are allocated
        broadcast = initialize_kwargs.get("broadcast")
        if broadcast is not None:
            # Every process finalised the same summed statistics, but eigensolvers need not round alike on every
            # process (thread scheduling, devices), and ranks must hold bit-identical adapters: all take process
            # 0's factors. NCCL sends device tensors only; a host model's (FSDP, before sharding) visit the device.
            target = torch.device(initialize_kwargs.get("device") or device)
            for layer in layers:
                for tensor in payloads[layer]:
                    work = tensor.to(target)
                    broadcast(work, 0)
                    tensor.copy_(work)
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


def _synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done (CUDA), so stage times are the stage's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _finalize(distinct: list[_Sums], mode: str, dtype: torch.dtype) -> dict[AdapterLayer, tuple[torch.Tensor, ...]]:
    """The small per-layer init factors from the reduced sums (see the module docstring).

    One decomposition per statistic, not per layer (q/k/v_proj share their input's), batched over
    same-shape statistics in chunks of ``inject._MAX_BATCH_BYTES``, and only the top components that are used:
    EVA ``pca_components`` (top k eigenpairs), CorDA ``corda_factors`` (top or bottom r of W C_d),
    LoRA-GA ``loraga_factors`` (top 2r of G).
    """
    counts = torch.stack([sums.count for sums in distinct]).tolist()  # one transfer for all of them
    for sums, count in zip(distinct, counts, strict=True):
        layer = sums.layers[0]
        if count == 0:
            raise ValueError(
                f"calibration saw no tokens for layer '{layer.layer_name}' ({layer.method}): every calibration "
                "token was padding" + (" or label-masked (labels == -100)" if sums.kind == "eva" else "")
            )
        if sums.kind == "eva" and count < 2:
            raise ValueError(f"calibration saw 1 token for layer '{layer.layer_name}' (eva); it needs at least 2")
    count_of = {id(sums): count for sums, count in zip(distinct, counts, strict=True)}
    payloads: dict[AdapterLayer, tuple[torch.Tensor, ...]] = {}
    for kind in ("eva", "corda", "gradient"):
        batchable = [sums for sums in distinct if sums.kind == kind]
        for chunk in _same_shape_chunks(batchable, 8 if kind == "eva" else 4):
            if kind == "eva":
                payloads |= _eva_payloads(chunk, [count_of[id(sums)] for sums in chunk])
            elif kind == "corda":
                payloads |= _corda_payloads(chunk, [count_of[id(sums)] for sums in chunk], mode, dtype)
            else:
                payloads |= _loraga_payloads(chunk, [count_of[id(sums)] for sums in chunk], dtype)
            for sums in chunk:  # release each statistic once its factors exist (7B: 22 GB of them)
                sums.outer = sums.total = None
    return payloads


def _same_shape_chunks(sums: list[_Sums], element_bytes: int) -> Iterator[list[_Sums]]:
    """Consecutive runs of same-shape statistics whose stacked copies take at most ``inject._MAX_BATCH_BYTES``."""
    by_shape: dict[tuple[int, ...], list[_Sums]] = {}
    for item in sums:
        by_shape.setdefault(tuple(item.outer.shape), []).append(item)
    for shape, items in by_shape.items():
        yield from stacked_chunks(items, shape, element_bytes)


def _eva_payloads(chunk: list[_Sums], counts: list[float]) -> dict[AdapterLayer, tuple[torch.Tensor, ...]]:
    covariances = []
    for sums, count in zip(chunk, counts, strict=True):
        mean = sums.total.double() / count
        covariances.append((sums.outer.double() - count * torch.outer(mean, mean)) / (count - 1))
    rank = max(layer.rank for sums in chunk for layer in sums.layers)
    V, ratios = pca_components(torch.stack(covariances), rank)
    return {
        layer: (V[i, :, : layer.rank], ratios[i, : layer.rank]) for i, sums in enumerate(chunk) for layer in sums.layers
    }


def _corda_payloads(
    chunk: list[_Sums], counts: list[float], mode: str, dtype: torch.dtype
) -> dict[AdapterLayer, tuple[torch.Tensor, ...]]:
    payloads = {}
    for sums, count in zip(chunk, counts, strict=True):
        # One damped inverse per input; the weights reading it (q, k, v) are decomposed together.
        covariance = (sums.outer / count).to(dtype)
        damped = damped_inverse(covariance)
        by_shape: dict[tuple[int, int], list[AdapterLayer]] = {}
        for layer in sums.layers:
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
        for same in by_shape.values():
            weights = torch.stack([layer.weight_matrix().to(dtype) for layer in same])
            rank = same[0].rank
            U, S, V = corda_factors(weights, covariance, rank, mode, dtype=dtype, damped=damped)
            payloads |= {layer: (U[i], S[i], V[i]) for i, layer in enumerate(same)}
    return payloads


def _loraga_payloads(
    chunk: list[_Sums], counts: list[float], dtype: torch.dtype
) -> dict[AdapterLayer, tuple[torch.Tensor, ...]]:
    mean = torch.stack([sums.outer / count for sums, count in zip(chunk, counts, strict=True)])
    layers = [sums.layers[0] for sums in chunk]
    A, B = loraga_factors(mean, layers[0].rank, dtype=dtype)
    return {layer: (A[i], B[i]) for i, layer in enumerate(layers)}
