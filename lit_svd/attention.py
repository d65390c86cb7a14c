"""Padding-free training: the sequences of a batch concatenated into one row, attention kept per sequence.

A packed batch is ``input_ids`` (1, N) with N = the sum of the sequence lengths, ``position_ids`` restarting
at 0 for every sequence, and ``cu_seq_lens`` (S+1,) int32 — the cumulative lengths, ``[0, l₀, l₀+l₁, …]``.
No token is padding, so no FLOP is spent on padding in any layer.

Attention must not cross sequence boundaries. :func:`packed_causal_attention` computes causal attention
inside each sequence: on CUDA in bf16/fp16 through PyTorch's variable-length FlashAttention
(``torch.nn.attention.varlen``), elsewhere one ``scaled_dot_product_attention`` per sequence — the exact,
CPU-testable reference of the same function. Hugging Face models that dispatch attention through
``AttentionInterface`` (Llama, Qwen2, Mistral, GPT-2, … in transformers ≥ 5) reach it while
:func:`packed_attention` is active: it switches the model to the ``"lit_svd_varlen"`` implementation, whose
mask function builds no mask, and back afterwards, so evaluation and generation keep the model's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel

__all__ = [
    "VARLEN_ATTENTION",
    "checkpoint_context_fn",
    "enable_activation_checkpointing",
    "packed_attention",
    "packed_causal_attention",
    "sequence_boundaries",
    "supports_packing",
    "varying_shape_attention",
]

VARLEN_ATTENTION = "lit_svd_varlen"
"""Name of the attention implementation registered with transformers' ``AttentionInterface``."""


def _flash_varlen() -> Any:
    """``torch.nn.attention.varlen.varlen_attn`` and how it is told "causal", or ``None`` if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # torch 2.10 takes is_causal=True; later versions express causality as window_size=(-1, 0).
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in parameters


_VARLEN = _flash_varlen()


def sequence_boundaries(lengths: list[int], device: torch.device | None = None) -> torch.Tensor:
    """``cu_seq_lens`` (S+1,) int32 of sequences with the given lengths: ``[0, l₀, l₀+l₁, …]``."""
    if any(length < 1 for length in lengths):
        raise ValueError(f"every packed sequence needs at least one token, got lengths {lengths}")
    boundaries = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    boundaries[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return boundaries.to(device) if device is not None else boundaries


def _per_sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    boundaries: list[int],
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    if query.shape[0] != boundaries[-1]:
        raise ValueError(f"cu_seq_lens ends at {boundaries[-1]} but the packed row has {query.shape[0]} tokens")
    output = torch.empty_like(query)
    grouped = bool(query.shape[1] != key.shape[1])
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        # (L, H, D) → (H, L, D): sdpa wants heads before positions.
        q, k, v = (tensor[start:end].transpose(0, 1) for tensor in (query, key, value))
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=grouped
        )
        output[start:end] = attended.transpose(0, 1)
    return output


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each of the packed sequences.

    Args:
        query: (N, H_q, D).
        key: (N, H_kv, D), H_q a multiple of H_kv (grouped-query attention).
        value: (N, H_kv, D).
        cu_seq_lens: (S+1,) int32 cumulative sequence lengths, ``cu_seq_lens[-1] == N``.
        max_length: the longest sequence's length.
        scale: softmax scale (default ``1/√D``).
        dropout: attention-probability dropout (the FlashAttention path has none: with dropout, every
            device takes the per-sequence path).

    Returns:
        (N, H_q, D): each position attends to itself and the earlier positions of its own sequence only.
    """
    if _VARLEN is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout:
        varlen_attn, causal, native_gqa = _VARLEN
        if query.shape[1] != key.shape[1] and not native_gqa:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if native_gqa and query.shape[1] != key.shape[1] else {}
        boundaries = cu_seq_lens.to(device=query.device, dtype=torch.int32)
        return varlen_attn(
            query, key, value, boundaries, boundaries, max_length, max_length, scale=scale, **causal, **extra
        )
    if torch.compiler.is_compiling():
        # The per-sequence loop reads the boundaries on the host, which a compiled layer cannot trace (and a
        # graph break inside a checkpointed layer sends the whole layer back to eager).
        return _block_diagonal_attention(query, key, value, cu_seq_lens, scale, dropout)
    return _per_sequence_attention(query, key, value, cu_seq_lens.tolist(), scale, dropout)


def _block_diagonal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """One attention call over the whole row with a causal block-diagonal (N, N) mask built on the device.

    Only under ``torch.compile`` where FlashAttention's varlen kernel does not apply (CPU, float32, dropout): its
    memory grows as N² per head (the math path materialises the scores), where the eager loop's grows as the
    longest sequence's square.
    """
    positions = torch.arange(query.shape[0], device=query.device)
    sequence = torch.searchsorted(cu_seq_lens[1:].to(query.device), positions, right=True)
    mask = (sequence[:, None] == sequence[None, :]) & (positions[:, None] >= positions[None, :])
    q, k, v = (tensor.transpose(0, 1) for tensor in (query, key, value))
    grouped = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}  # a branch: traced as a plain bool
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, **grouped)
    return attended.transpose(0, 1)


def _hf_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` entry: (1, H, N, D) tensors in, (1, N, H, D) out."""
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:
        raise ValueError(
            f"attention '{VARLEN_ATTENTION}' needs a packed batch (cu_seq_lens_q / max_length_q); use "
            "it only inside lit_svd.attention.packed_attention with a packed batch"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch has one row, got query of shape {tuple(query.shape)}")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"{type(module).__name__}: sliding-window or soft-capped attention is not supported in packed batches"
        )
    output = packed_causal_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        boundaries,
        int(kwargs["max_length_q"]),
        scale=scaling,
        dropout=dropout if module.training else 0.0,
    )
    return output.unsqueeze(0), None


# No mask function is registered for it: packed attention takes its sequence boundaries from cu_seq_lens, and
# transformers builds no mask for an implementation without one. With one (even returning None), it would first
# look for packed sequences in position_ids, a check read on the host: one sync per forward.
AttentionInterface.register(VARLEN_ATTENTION, _hf_varlen_attention)


_SDPA_BACKEND_FLAGS = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


def varying_shape_attention() -> AbstractContextManager:
    """``scaled_dot_product_attention`` without cuDNN's fused attention, for calls whose shapes keep changing.

    cuDNN attention (which PyTorch 2.11 picks for masked bf16 attention on an H200) builds an execution plan
    for every new input shape: 171 ms per forward + backward call at a new sequence length against 0.94 ms at a
    length seen before (memory-efficient attention: 2.4 and 1.7 ms; bench/results/sdpa_backends.json).
    Padded training batches, calibration batches and generation change length from call to call, so each paid
    that plan in every layer; FlashAttention, memory-efficient attention and the math path plan nothing.
    Used by ``LitSVDAdapter.compute_loss`` (padded batches), generation and ``calibrate``.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a transformers model that routes attention through ``AttentionInterface`` (so it can
    be packed); a wrapper such as PEFT's ``PeftModel`` is not (unwrap it first)."""
    return isinstance(model, PreTrainedModel) and bool(getattr(model, "_supports_attention_backend", False))


@contextmanager
def packed_attention(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, ``model``'s attention is :func:`packed_causal_attention`; restored afterwards.

    Raises:
        ValueError: when the model does not dispatch attention through ``AttentionInterface``.
    """
    if not supports_packing(model):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so "
            "its batches cannot be packed; set pack_sequences=False"
        )
    with _attention_implementation(model.config, VARLEN_ATTENTION):
        yield


@contextmanager
def _attention_implementation(config: Any, implementation: str | None) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextmanager
def _attention_as_in_forward(config: Any, implementation: str | None, backends: list[SDPBackend]) -> Iterator[None]:
    with _attention_implementation(config, implementation), sdpa_kernel(backends):
        yield


def enable_activation_checkpointing(model: PreTrainedModel, checkpoint_kwargs: dict[str, Any]) -> None:
    """Per-layer activation (gradient) checkpointing of ``model`` with these ``torch.utils.checkpoint`` arguments.

    transformers ≥ 5.2x names it ``activation_checkpointing_enable`` and deprecates ``gradient_checkpointing_enable``
    (a ``FutureWarning`` at every model build, removal in v6); the older name is used where the new one is absent.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def checkpoint_context_fn(
    model: PreTrainedModel,
) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: recomputation runs the forward's attention.

    Gradient checkpointing recomputes a layer's forward during ``backward()``, after :func:`packed_attention`
    has already switched the model back to its own attention: the recomputation of a packed batch then ran
    (mask-free) SDPA over the whole row, saving other tensors than the forward did, and PyTorch stopped
    with ``CheckpointError: A different number of tensors was saved``. This captures the implementation in
    use when each checkpointed forward runs and sets it again around that layer's recomputation.

    Example::

        enable_activation_checkpointing(
            model, {"use_reentrant": False, "context_fn": checkpoint_context_fn(model)}
        )
    """
    config = model.config

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        # The SDPA backends too (varying_shape_attention): another backend saves other tensors.
        backends = [backend for backend, enabled in _SDPA_BACKEND_FLAGS.items() if enabled()]
        return nullcontext(), _attention_as_in_forward(config, config._attn_implementation, backends)

    return context_fn
