"""4-bit NormalFloat (NF4) frozen base weights: QLoRA, QPiSSA, QSORSA, QOSoRA, QOLoRA and LoftQ.

```
x ──┬── NF4Linear: deq(Q(W_res)) (4-bit, frozen, dequantized per call) ──┐
    └── adapter (full precision, trainable) ─────────────────────────────(+)──> h
```

The order is the one QPiSSA prescribes: the adapter is initialised from the **full-precision** weight
exactly as without quantization, and only then the frozen residual ``W_res = W − delta_0`` is quantized
(``W`` itself for LoRA, i.e. QLoRA). The residual's narrower spread gives a smaller quantization error than
quantizing ``W``. The quantizer is bitsandbytes' blockwise NF4 (64 weights per block, one absmax each;
double quantization stores the absmaxes in 8 bits, 256 per second-level block): the same codes as
``BitsAndBytesConfig(bnb_4bit_quant_type="nf4")`` and as PEFT's QLoRA, on CPUs and GPUs alike. Why
bitsandbytes and not torchao's ``NF4Tensor``: docs/quantization.md.

``NF4Linear`` keeps the 4-bit codes and scales as plain (non-persistent) buffers, so ``.to(device)`` moves
them and no state dict or checkpoint ever holds the base: a resumed run re-derives the residual from the
original weights and the adapter's init snapshot and quantizes it again, bit-identically.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
from torch import nn

__all__ = ["QUANTIZATIONS", "BaseQuantization", "NF4Linear", "nf4_round_trip", "quantizable_dtype"]

#: Names accepted by ``AdapterConfig.base_quantization``.
QUANTIZATIONS = ("nf4",)
BaseQuantization = Literal["nf4"]
_BLOCKSIZE = 64  # weights per absmax: QLoRA's and bitsandbytes' default
_QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16)


def quantizable_dtype(dtype: torch.dtype) -> bool:
    """Whether bitsandbytes' NF4 quantizer takes weights of ``dtype`` (float32, bfloat16, float16)."""
    return dtype in _QUANTIZABLE


@functools.cache
def _functional():
    """``bitsandbytes.functional``, imported on first use (2 s), without its CPU-kernel download notice."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward from kernels-community": optional
    try:
        import bitsandbytes.functional as functional
    except ImportError as err:
        raise ImportError(
            "base_quantization='nf4' needs bitsandbytes: pip install 'lit_svd[quantization]' (or bitsandbytes)"
        ) from err
    finally:
        logger.setLevel(level)
    return functional


def _dequantize_nf4_kernels(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The flat ``(numel,)`` weight of NF4 codes ``packed`` in ``dtype`` (float32/bfloat16/float16).

    ``nested_*`` and ``offset`` are given when the absmaxes are themselves 8-bit (double quantization), else
    ``None``. One operator of our own around bitsandbytes' kernels, so that ``torch.compile`` traces a 4-bit
    layer whole: bitsandbytes' ``functional.dequantize_4bit`` (``QuantState`` bookkeeping, a lazy import)
    breaks the trace, and its operator's shape on the CPU, ``(1, numel)``, is not the one its fake kernel
    declares, ``(numel,)``.
    """
    if nested_absmax is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested_absmax, nested_code, 256, torch.float32)
        absmax = absmax + offset
    # Flat: bitsandbytes 0.50's CPU kernel dequantizes a 2-D shape wrongly when in_features is not a multiple
    # of the block size (tiny test models: 23-37 % error instead of 9 %); the CUDA one is flat anyway.
    # tests/test_quantization.py pins the result against a pure-torch NF4 reference.
    flat = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, _BLOCKSIZE, "nf4", [numel], dtype)
    return flat.reshape(numel)


_dequantize_nf4_op = torch.library.custom_op("lit_svd::dequantize_nf4", _dequantize_nf4_kernels, mutates_args=())


@_dequantize_nf4_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


def _dequantized_weight(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested: tuple[torch.Tensor, ...],
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``shape`` weight in ``dtype``; dtypes the kernel lacks (float64) are dequantized in float32.

    ``nested``: ``(nested_absmax, nested_code, offset)`` with double quantization, else empty. Under
    ``torch.compile`` through the operator; outside it the plain function (the operator's dispatch costs
    ~10 µs a call, some 700 calls a step for a 7B model).
    """
    work = dtype if quantizable_dtype(dtype) else torch.float32
    dequantize = _dequantize_nf4_op if torch.compiler.is_compiling() else _dequantize_nf4_kernels
    flat = dequantize(packed, absmax, *(nested or (None, None, None)), shape[0] * shape[1], work)
    return flat.view(shape).to(dtype)


class _DequantizedLinear(torch.autograd.Function):
    """``y = x deq(Q)ᵀ + b`` that saves no (m, n) tensor for backward: it dequantizes again there.

    Takes the layer's buffers as tensors (not the layer) so that ``torch.compile`` traces it as one operator.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        shape: tuple[int, int],
        packed: torch.Tensor,
        absmax: torch.Tensor,
        *nested: torch.Tensor,
    ) -> torch.Tensor:
        ctx.shape = shape
        ctx.save_for_backward(packed, absmax, *nested)
        weight = _dequantized_weight(packed, absmax, tuple(nested), shape, x.dtype)
        return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        packed, absmax, *nested = ctx.saved_tensors
        nones = (None,) * (4 + len(nested))
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        weight = _dequantized_weight(packed, absmax, tuple(nested), ctx.shape, grad_output.dtype)
        return (grad_output @ weight, *nones)


class NF4Linear(nn.Module):
    """A frozen linear layer whose ``(out, in)`` weight is stored as 4-bit NF4 codes.

    Built by ``from_matrix`` (never by hand). The forward dequantizes the weight (bitsandbytes' kernel, on
    CPU or GPU) into a temporary and multiplies; backward dequantizes again rather than keeping the
    temporary, so no full-precision (m, n) tensor outlives a call.

    Attributes:
        weight: The dequantized weight in the wrapped layer's own layout — ``(out, in)``, or ``(in, out)``
            for a GPT-2 ``Conv1D`` — as a fresh tensor (read-only: writing to it changes nothing).
        bias: The original layer's bias, frozen, or ``None``.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        conv1d: bool,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.dtype = dtype
        self.conv1d = conv1d
        self.double_quantization = "offset" in tensors
        for name, tensor in tensors.items():
            # Non-persistent: the base never enters a state dict; resume re-quantizes from the original W.
            self.register_buffer(name, tensor, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_matrix(
        cls,
        matrix: torch.Tensor,
        bias: torch.Tensor | None = None,
        conv1d: bool = False,
        double_quantization: bool = True,
    ) -> NF4Linear:
        """Quantize ``matrix`` (out, in) to NF4 where it lives; ``bias`` (out,) is kept as it is.

        Args:
            matrix: The frozen weight, ``(out_features, in_features)``, float32/bfloat16/float16.
            bias: Bias of the wrapped layer, or ``None``.
            conv1d: Whether ``weight`` should be reported in GPT-2 ``Conv1D`` layout ``(in, out)``.
            double_quantization: Store the per-block absmaxes in 8 bits (QLoRA's double quantization:
                0.127 instead of 0.5 bits per weight of overhead).
        """
        if not quantizable_dtype(matrix.dtype):
            raise ValueError(f"NF4 quantization takes float32/bfloat16/float16 weights, got {matrix.dtype}")
        functional = _functional()
        packed, state = functional.quantize_4bit(
            matrix.contiguous(), blocksize=_BLOCKSIZE, compress_statistics=double_quantization, quant_type="nf4"
        )
        tensors = {"packed": packed, "absmax": state.absmax}  # the NF4 code table is the kernel's own
        if state.nested:
            tensors |= {
                "nested_absmax": state.state2.absmax,
                "nested_code": state.state2.code,
                "offset": state.offset.reshape(()),
            }
        return cls(tuple(matrix.shape), matrix.dtype, tensors, bias, conv1d)

    def _nested(self) -> tuple[torch.Tensor, ...]:
        """``(nested_absmax, nested_code, offset)`` with double quantization, else empty."""
        return (self.nested_absmax, self.nested_code, self.offset) if self.double_quantization else ()

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight ``deq(Q)`` in ``dtype`` (default: the quantized weight's own dtype)."""
        shape = (self.out_features, self.in_features)
        return _dequantized_weight(self.packed, self.absmax, self._nested(), shape, dtype or self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        matrix = self.dequantized()
        return matrix.T if self.conv1d else matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return _DequantizedLinear.apply(x, self.bias, shape, self.packed, self.absmax, *self._nested())

    def extra_repr(self) -> str:
        double = ", double_quantization" if self.double_quantization else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, dtype={self.dtype}{double}"


@torch.no_grad()
def nf4_round_trip(matrix: torch.Tensor, double_quantization: bool = True) -> torch.Tensor:
    """``deq(Q(matrix))`` in ``matrix``'s dtype: what an NF4 base holds in place of ``matrix`` (..., m, n)."""
    flat = matrix.reshape(-1, *matrix.shape[-2:])
    out = [NF4Linear.from_matrix(m, double_quantization=double_quantization).dequantized() for m in flat]
    return torch.stack(out).reshape(matrix.shape)
