"""Greedy decoding whose per-token step is one CUDA graph replay.

    prefill: model(prompt, static KV cache of prompt + max_new_tokens columns) → first token
    step:    feed the last token at its position, attend over the cache's valid columns, argmax,
             write the token, advance the buffers — all in place, all on the device
    on CUDA: run the step once eagerly (warm-up), capture it once, replay it for every later token;
             read "all rows finished?" back to the host only every ``check_every`` tokens

A 7B model decoding 256 rows launches ~1,000 kernels per token from Python; Hugging Face's ``generate``
removes that host work only by compiling the decoding step with ``torch.compile``, which for a 7B model
takes minutes per new cache length. Capturing the eager step as a CUDA graph compiles nothing: the
capture costs one step. It needs a step without host synchronisations, so the step builds its own
attention mask (a 4-D mask is used by transformers as given) and keeps positions, the cache column and
the finished flags as device tensors.

The outputs equal ``generate(do_sample=False, cache_implementation="static")``: the same static cache,
the same positions (cumulative sum of the prompt's attention mask) and the same stopping rule (the EOS
token is kept, later tokens are padding, decoding ends when every row has finished).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StaticCache

from lit_svd.graphs import autocast_without_weight_cache

__all__ = ["GraphedGreedyDecoder", "capture_step", "greedy_decode"]


class GraphedGreedyDecoder:
    """The state of one batch's greedy decoding; :meth:`step` advances it by one token on the device.

    Args:
        model: a Hugging Face causal LM with ``sdpa`` or ``eager`` attention and a cache of full-attention
            layers only (Llama, Qwen2 without sliding windows, Mistral without, …).
        prompt_input_ids: (B, P) long, left-padded.
        prompt_attention_mask: (B, P), 0 on padding.
        max_new_tokens: T, the cache holds P + T columns.
        eos_token_ids: the token ids that end a row.
        pad_token_id: written after a row's EOS.
    """

    def __init__(
        self,
        model: Any,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if prompt_input_ids.shape != prompt_attention_mask.shape or prompt_input_ids.ndim != 2:
            raise ValueError(
                f"prompt_input_ids {tuple(prompt_input_ids.shape)} and prompt_attention_mask "
                f"{tuple(prompt_attention_mask.shape)} must both be (batch, prompt length)"
            )
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"graphed greedy decoding builds its own attention mask for 'sdpa' or 'eager' attention; this "
                f"model uses {implementation!r} (load it with attn_implementation='sdpa')"
            )
        self.model = model
        batch, prompt_length = prompt_input_ids.shape
        device = prompt_input_ids.device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_length + max_new_tokens)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError(
                "graphed greedy decoding supports full-attention caches only; this model has sliding-window "
                "layers (use generate_batch(static_cache=True) instead)"
            )
        forward_parameters = inspect.signature(model.forward).parameters
        # transformers ≥ 5.2x renames past_key_values to cache; a wrapper's forward(**kwargs) takes the old name.
        self._cache_keyword = "cache" if "cache" in forward_parameters else "past_key_values"
        self._additive_mask = implementation == "eager"
        self.eos_token_ids = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self.pad_token_id = pad_token_id
        # (B, P + T) bool: which cache columns each row may attend to; a decoding step adds its own column.
        self.key_valid = torch.zeros(batch, prompt_length + max_new_tokens, dtype=torch.bool, device=device)
        self.key_valid[:, :prompt_length] = prompt_attention_mask.bool()
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        positions = prompt_attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(prompt_attention_mask == 0, 0)  # what generate() gives padding
        # The prefill's logits for the last position only, where the model can (B × P × vocab otherwise).
        keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        self._prefill(prompt_input_ids, positions, keep_last)
        # Device-side counters of the step: the cache column of the token fed, its position, its output slot.
        self.step_input = self.tokens[:, :1].clone()
        self.step_position = positions[:, -1:] + 1
        self.cache_column = torch.tensor([prompt_length], dtype=torch.long, device=device)
        self.output_column = torch.tensor([1], dtype=torch.long, device=device)

    def _forward(self, **inputs: Any) -> torch.Tensor:
        inputs[self._cache_keyword] = self.cache
        return self.model(**inputs, use_cache=True).logits[:, -1]

    def _emit(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice for unfinished rows, padding for finished ones; marks rows that reach EOS."""
        choice = logits.argmax(-1)
        choice = torch.where(self.finished, self.pad_token_id, choice)
        self.finished |= torch.isin(choice, self.eos_token_ids)
        return choice

    def _prefill(self, prompt_input_ids: torch.Tensor, positions: torch.Tensor, extra: dict[str, Any]) -> None:
        logits = self._forward(
            input_ids=prompt_input_ids, attention_mask=self.key_valid.long(), position_ids=positions, **extra
        )
        self.tokens[:, 0] = self._emit(logits)

    def step(self) -> None:
        """Feed the last token, choose the next; reads nothing back to the host (capturable)."""
        self.key_valid.index_fill_(1, self.cache_column, True)
        mask = self.key_valid[:, None, None, :]
        if self._additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.model.dtype).min
            )
        logits = self._forward(input_ids=self.step_input, attention_mask=mask, position_ids=self.step_position)
        choice = self._emit(logits)
        self.tokens.index_copy_(1, self.output_column, choice[:, None])
        self.step_input.copy_(choice[:, None])
        self.step_position.add_(1)
        self.cache_column.add_(1)
        self.output_column.add_(1)

    def new_tokens(self) -> torch.Tensor:
        """(B, W) the tokens generated, W up to the step at which the last row finished (as ``generate``)."""
        is_eos = torch.isin(self.tokens, self.eos_token_ids)
        last = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), self.tokens.shape[1] - 1)
        return self.tokens[:, : int(last.max()) + 1]


def capture_step(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run once on a side stream (warm-up: cuBLAS handles, lazy allocations), then captured as a CUDA
    graph; returns the graph's ``replay``, which repeats the captured work on the same tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with autocast_without_weight_cache("cuda"), torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.no_grad()
def greedy_decode(
    model: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] | int | None,
    pad_token_id: int,
    cuda_graph: bool | None = None,
    check_every: int = 16,
) -> torch.Tensor:
    """Greedy decoding of left-padded prompts with a static KV cache; the step a CUDA graph on CUDA.

    Args:
        model: see :class:`GraphedGreedyDecoder`.
        prompt_input_ids: (B, P) long, left-padded.
        prompt_attention_mask: (B, P), 0 on padding.
        max_new_tokens: T, the generation budget.
        eos_token_ids: the id (or ids) ending a row; ``None``: rows run to ``max_new_tokens``.
        pad_token_id: written after a row's EOS.
        cuda_graph: capture the step and replay it (default: when the prompts are on a CUDA device).
        check_every: tokens between the host's checks that every row has finished.

    Returns:
        (B, W) long, W ≤ T: the new tokens only, as ``generate(...)[:, P:]`` returns them.
    """
    if eos_token_ids is None:
        eos_token_ids = []
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    if cuda_graph is None:
        cuda_graph = prompt_input_ids.device.type == "cuda"
    if cuda_graph and prompt_input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the prompts on a CUDA device, not {prompt_input_ids.device}")
    decoder = GraphedGreedyDecoder(
        model, prompt_input_ids, prompt_attention_mask, max_new_tokens, eos_token_ids, pad_token_id
    )
    step = decoder.step
    for produced in range(1, max_new_tokens):
        if produced % check_every == 0 and bool(decoder.finished.all()):
            break
        if cuda_graph and step == decoder.step:
            step = capture_step(decoder.step)  # runs this token's step once as the warm-up, then records it
            continue
        step()
    return decoder.new_tokens()
