"""Liger Kernel's Triton kernels for training on GPUs: fused RMSNorm, SwiGLU and RoPE, and the fused loss head.

``LitSVDAdapter(liger_kernels=True)`` (on in ``recipes/configs/overlays/fast_7b.yaml``) patches Liger's
RMSNorm, SwiGLU and RoPE into the transformers model (what TRL's ``use_liger_kernel`` does; the adapted
projections stay ours, Liger's MLP calls them), and the loss head becomes Liger's fused linear
cross-entropy instead of ``lit_svd.losses.linear_cross_entropy``. Both only on CUDA devices: Liger's kernels
are Triton kernels, so on a CPU the flag warns and PyTorch's modules and our chunked loss stay.

Why, measured on one H200 (docs/performance.md §5, "7B against TRL"): a Llama-2-7B-shaped model, SORSA
r = 128, packed rows: 11,393 → 14,684 tokens/s and 87.0 → 71.9 GB peak with the three kernels (a 7B layer's
normalisations, rotary embedding and gate are unfused element-wise passes over the activations otherwise);
the loss head alone (16,384 labelled positions, vocabulary 49,152, bf16): 31.6 → 20.9 ms and 3.36 → 0.34 GB
(``bench/fused_ce.py``).

Liger patches the transformers modelling module of the model's family as a whole (its RoPE function is a
module global), so every model of that family in the process computes its rotary embedding with Liger's
kernel afterwards; the result is the same function up to rounding. Models of that family built later in the
process get Liger's RMSNorm and MLP too, which ``torch.compile`` cannot trace: with ``compile=True`` the
module uses Liger's loss head only, and compiled layers need a process in which Liger has not patched them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

__all__ = ["apply_liger_kernels", "liger_linear_cross_entropy"]

_INSTALL_HINT = "pip install liger-kernel (it needs a CUDA build of PyTorch with Triton)"


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Patch Liger's RMSNorm, SwiGLU and RoPE into ``model`` (in place); the loss head is left as it is.

    Raises:
        ImportError: Liger Kernel is not installed.
        ValueError: Liger has no kernels for this model type.
    """
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError as error:
        raise ImportError(f"liger_kernels=True needs Liger Kernel, which is not installed: {_INSTALL_HINT}") from error
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(
            f"Liger Kernel has no kernels for model type {model_type!r} (it has: "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); pass liger_kernels=False"
        )
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def liger_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weightᵀ + bias`` against ``targets`` by Liger's fused kernel.

    The same contract as ``lit_svd.losses.linear_cross_entropy``: ``hidden`` (N, H) the labelled rows only,
    ``weight`` (V, H), ``targets`` (N,); a float32 scalar. Inputs are brought to the weight's dtype, as the
    logits would be under autocast.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden.to(weight.dtype), weight, targets, bias)
    return loss.float()
