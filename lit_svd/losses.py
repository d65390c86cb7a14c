"""The training loss: causal-LM cross-entropy computed only where a label exists, without full logits.

A causal LM's head maps every position's hidden state to ``V`` logits (SmolLM2: 49,152; Llama-3: 128,256),
but instruction tuning scores only the response tokens — prompt and padding positions carry label −100.
:func:`causal_lm_loss` keeps the positions whose *next* token is labelled, and
:class:`LinearCrossEntropy` evaluates head + cross-entropy on them in row chunks, producing the gradient of
the hidden states during the forward pass. So no ``(B, T, V)`` logits tensor (nor its float32 copy and
log-softmax) is ever stored: memory is one ``(chunk, V)`` block, and the head's FLOPs scale with the
labelled tokens instead of all tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from lit_svd.attention import packed_attention, varying_shape_attention

__all__ = ["IGNORE_INDEX", "LinearCrossEntropy", "causal_lm_batch_loss", "causal_lm_loss", "linear_cross_entropy"]

IGNORE_INDEX = -100
"""Label value that takes no part in the loss (prompt, padding, sequence boundaries when packed)."""

_CHUNK_ELEMENTS = 1 << 28
"""Logit elements per chunk (float32: 1 GiB): rows per chunk = this ÷ vocabulary size."""


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on for the tensor's device."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """``mean(cross_entropy(hidden @ weightᵀ + bias, targets))`` with the backward done in the forward.

    Inputs: ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or ``None``, ``targets`` (N,) long (no ignored
    entries: select the labelled rows first), ``chunk_rows`` int. Output: a float32 scalar.
    The logits of each chunk are formed in the compute dtype (autocast's, else the inputs'), soft-maxed in
    float32, and turned at once into ``∂loss/∂hidden`` (and ``∂loss/∂weight``, ``∂loss/∂bias`` when those
    require grad), which the backward only scales by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):  # noqa: D102 - documented on the class
        rows = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        # Soft-max in float32 at least (float64 inputs stay float64).
        accumulate = torch.promote_types(dtype, torch.float32)
        weight_c = weight.to(dtype)
        bias_f = bias.to(accumulate) if bias is not None else None
        need_hidden = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=accumulate, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            hidden_c = hidden[start : start + chunk_rows].to(dtype)
            targets_c = targets[start : start + chunk_rows]
            logits = (hidden_c @ weight_c.T).to(accumulate)
            if bias_f is not None:
                logits += bias_f
            log_normalizer = torch.logsumexp(logits, dim=-1)
            loss_sum += (log_normalizer - logits.gather(1, targets_c[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight or need_bias:
                # ∂ mean CE / ∂ logits = (softmax − one_hot) / N, built in place over the logits.
                probabilities = logits.sub_(log_normalizer[:, None]).exp_()
                probabilities[torch.arange(len(targets_c), device=targets_c.device), targets_c] -= 1.0
                probabilities /= rows
                if need_hidden:
                    grad_hidden[start : start + chunk_rows] = (probabilities.to(dtype) @ weight_c).to(hidden.dtype)
                if need_weight:
                    grad_weight += probabilities.T @ hidden_c.to(accumulate)
                if need_bias:
                    grad_bias += probabilities.sum(0)
        ctx.save_for_backward(*(grad for grad in (grad_hidden, grad_weight, grad_bias) if grad is not None))
        ctx.needs = (need_hidden, need_weight, need_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return (loss_sum / rows).float()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_output).to(dtype) if needed else None
            for needed, dtype in zip(ctx.needs, ctx.dtypes, strict=True)
        ]
        return *grads, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weightᵀ + bias`` against ``targets``, chunked and fused.

    Args:
        hidden: (N, H) hidden states of the scored positions.
        weight: (V, H) output-embedding matrix.
        targets: (N,) long target ids in ``[0, V)``.
        bias: (V,) output bias, or ``None``.
        chunk_rows: rows per chunk (default: as many as fit 2²⁸ float32 logits).

    Returns:
        A float32 scalar; 0 (with a zero gradient) when ``N == 0``.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) must agree on H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        return hidden.sum().float() * 0.0
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)


def causal_lm_loss(
    hidden_states: torch.Tensor,
    output_embeddings: nn.Linear,
    labels: torch.Tensor,
    chunk_rows: int | None = None,
    scored_positions: torch.Tensor | None = None,
    kernel: Literal["lit_svd", "liger"] = "lit_svd",
) -> torch.Tensor:
    """Next-token cross-entropy averaged over labelled tokens, scoring only the positions that have a label.

    Equal to ``cross_entropy(lm_head(hidden)[:, :-1], labels[:, 1:], ignore_index=-100)`` (mean over
    labelled tokens), for padded ``(B, T)`` and packed ``(1, N)`` batches alike: in a packed row each
    sequence's first token carries label −100, so no position predicts across a boundary.

    Args:
        hidden_states: (B, T, H) final hidden states (after the last norm).
        output_embeddings: the LM head (``model.get_output_embeddings()``), weight (V, H), optional bias.
        labels: (B, T) long, −100 where no loss is taken.
        chunk_rows: see :func:`linear_cross_entropy`.
        scored_positions: (K,) long, the flat indices into the ``(B, T − 1)`` grid of the positions whose
            next token is labelled (what ``InstructionCollator`` emits for packed rows). Selecting rows by
            index avoids the host synchronisation that selecting them by a boolean mask costs (the row count
            of a mask is only known once the device has computed it). ``None``: select by mask.
        kernel: ``"lit_svd"``: :func:`linear_cross_entropy`; ``"liger"``: Liger Kernel's fused linear
            cross-entropy (CUDA only; ``lit_svd.kernels``).

    Returns:
        A float32 scalar.
    """
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden_states (B, T, H) and labels (B, T) disagree: {tuple(hidden_states.shape)} vs {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    if scored_positions is None:
        scored = targets != IGNORE_INDEX
        hidden, targets = hidden_states[:, :-1][scored], targets[scored]
    else:
        index = scored_positions.to(hidden_states.device)
        hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1]).index_select(0, index)
        targets = targets.reshape(-1).index_select(0, index)
    if kernel == "liger":
        from lit_svd.kernels import liger_linear_cross_entropy

        return liger_linear_cross_entropy(hidden, output_embeddings.weight, targets, output_embeddings.bias)
    if kernel != "lit_svd":
        raise ValueError(f"kernel must be 'lit_svd' or 'liger', got {kernel!r}")
    return linear_cross_entropy(
        hidden, output_embeddings.weight, targets, bias=output_embeddings.bias, chunk_rows=chunk_rows
    )


def causal_lm_batch_loss(
    model: PreTrainedModel, batch: Mapping[str, Any], kernel: Literal["lit_svd", "liger"] = "lit_svd"
) -> torch.Tensor:
    """A transformers causal LM's masked loss on a padded or packed batch: mean cross-entropy over the tokens
    whose label is not −100 (what ``LitSVDAdapter.compute_loss`` trains on).

    Padded batches (``input_ids``, ``attention_mask``, ``labels`` (B, T)) run with attention backends that plan
    nothing per shape (``varying_shape_attention``); packed ones (``cu_seq_lens``, see ``lit_svd.attention``)
    with packed attention, and give the same value. The head and the cross-entropy run on labelled positions
    only (:func:`causal_lm_loss`), unless the model post-processes its logits (soft-capping, logit scaling).

    Returns:
        A float32 scalar.
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    packed = "cu_seq_lens" in batch
    if packed:
        boundaries, longest = batch["cu_seq_lens"], int(batch["max_length"])
        inputs |= {
            "position_ids": batch["position_ids"],
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": longest,
            "max_length_k": longest,
        }
    else:
        inputs["attention_mask"] = batch.get("attention_mask")
    # Padded rows change length from batch to batch: attention without cuDNN's per-shape plans.
    with packed_attention(model) if packed else varying_shape_attention():
        if not plain_lm_head(model):
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return causal_lm_loss(
        hidden,
        model.get_output_embeddings(),
        batch["labels"],
        scored_positions=batch.get("scored_positions"),
        kernel=kernel,
    )


def plain_lm_head(model: PreTrainedModel) -> bool:
    """Whether the logits are exactly ``lm_head(base_model(...).last_hidden_state)`` (then the loss is fused)."""
    config = model.config
    head = model.get_output_embeddings()
    post_processed = any(
        getattr(config, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale")
    )
    return isinstance(head, torch.nn.Linear) and model.base_model is not model and not post_processed
