"""Standalone generation-based evaluation of a (trained or merged) Hugging Face causal LM.

    order = questions sorted by prompt length, longest first        (less padding per batch)
    for each batch of that order (left-padded prompts):
        new_tokens = model.generate(prompt, greedy, KV cache, stop at EOS)[:, prompt_width:]
        metric.update(decode(new_tokens), references, tasks)
    return metric.compute() as floats; predictions back in dataset order

A decoding step is dominated by per-step overhead, not arithmetic, so throughput comes from few, large
batches (``batch_size``) and, on CUDA, from a static KV cache whose decoding step runs as a CUDA graph:
captured from the eager step without compiling (``graphed_decode=True``, :mod:`lit_svd.eval.decode`; the
fast path for large models) or compiled by transformers (``compile=True``, minutes for a 7B model);
``bench/generate.py`` measures them.

The datamodule decides the data, the prompt template and the metric, so ``evaluate(model, tok, dm)``
scores GSM8K, MATH or the commonsense suite the same way the ``LightningModule`` does during validation.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lit_svd.attention import varying_shape_attention
from lit_svd.eval.answers import is_correct
from lit_svd.eval.decode import greedy_decode

__all__ = ["evaluate", "generate_batch"]


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int = 512,
    static_cache: bool = False,
    compile: bool = True,
    graphed_decode: bool = False,
) -> list[str]:
    """Greedy generation for a batch of left-padded prompts.

    Args:
        model: a Hugging Face causal LM (``generate`` with KV cache).
        tokenizer: its tokenizer (EOS and pad ids, decoding).
        prompt_input_ids: (B, P) long, left-padded.
        prompt_attention_mask: (B, P) long, 0 on padding.
        max_new_tokens: generation budget per example; rows stop early at EOS.
        static_cache: preallocate the KV cache (``cache_implementation="static"``): the cache is written in
            place instead of grown by concatenation every step.
        compile: with ``static_cache``, let transformers compile the decoding step (CUDA graphs, on CUDA),
            which pays off over many steps of one shape; ``False`` keeps the static cache eager (no
            compilation time, e.g. for a 7B model whose decoding step takes minutes to compile).
        graphed_decode: decode with :func:`~lit_svd.eval.decode.greedy_decode` instead of ``generate``: a
            static cache whose decoding step is captured as a CUDA graph without compiling (on CUDA; eager
            elsewhere). Same tokens as ``generate`` with a static cache; ``static_cache``/``compile`` unused.

    Returns:
        B decoded strings: the new tokens only, special tokens removed.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if graphed_decode:
        new_tokens = greedy_decode(
            model, prompt_input_ids, prompt_attention_mask, max_new_tokens, tokenizer.eos_token_id, pad_token_id
        )
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    # Each decoding step attends over one more position: a new shape for cuDNN attention to plan, unless the
    # static cache keeps one shape (then its plan is reused).
    with nullcontext() if static_cache else varying_shape_attention():
        output = model.generate(
            input_ids=prompt_input_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id,
            # Greedy decoding: neutralise sampling defaults that a checkpoint's generation_config may carry.
            temperature=None,
            top_p=None,
            top_k=None,
            **({"cache_implementation": "static", "disable_compile": not compile} if static_cache else {}),
        )
    new_tokens = output[:, prompt_input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    datamodule: Any,
    max_new_tokens: int = 512,
    batch_size: int | None = None,
    progress: bool = True,
    return_predictions: bool = False,
    sort_by_length: bool = True,
    compile: bool = False,
    static_cache: bool = False,
    graphed_decode: bool = False,
) -> dict[str, Any]:
    """Score a model on a datamodule's evaluation set by batched greedy generation.

    Args:
        model: a Hugging Face causal LM (e.g. after ``merge_and_unload()``); it is put in eval mode and its
            device is used.
        tokenizer: the model's tokenizer; handed to the datamodule, which tokenises with it.
        datamodule: an :class:`~lit_svd.data.base.InstructionDataModule` (GSM8K, MATH, MetaMathQA,
            Commonsense); its ``max_eval_examples`` limits the number of questions.
        max_new_tokens: generation budget per question.
        batch_size: questions per ``generate`` call (default: the datamodule's ``eval_batch_size``). On a
            GPU, larger is faster until memory runs out (KV cache ≈ batch × (prompt + new tokens) × layers ×
            2 × kv_heads × head_dim × 2 bytes).
        progress: show a tqdm progress bar.
        return_predictions: also return every question's generation, reference and verdict.
        sort_by_length: batch questions of similar prompt length together (longest first, so running out
            of memory happens at once); results and predictions are reported in dataset order either way.
        compile: static KV cache with transformers' compiled (CUDA-graph) decoding step; the first batch of
            each shape pays the compilation.
        static_cache: a static KV cache without compilation (implied by ``compile``).
        graphed_decode: greedy decoding whose per-token step is a captured CUDA graph (no compilation; the
            fastest path for large models, see ``docs/performance.md`` §4); eager on the CPU.

    Returns:
        ``{"accuracy": float, "num_examples": int}`` for single-task metrics; for multi-task metrics
        ``{"accuracy": average, "accuracy/<task>": float, ..., "num_examples": int}``. With
        ``return_predictions``, ``"predictions"`` is a list of ``{"task", "reference", "generation",
        "correct"}`` dicts in dataset order.
    """
    datamodule.set_tokenizer(tokenizer)  # a no-op when it already has this one
    datamodule.setup("test")
    loader = datamodule.eval_dataloader(batch_size)
    order = list(range(len(loader.dataset)))
    if sort_by_length:
        prompt_lengths = [int(n) for n in loader.dataset["prompt_length"]]
        order.sort(key=lambda i: -prompt_lengths[i])
        loader = DataLoader(
            loader.dataset, loader.batch_size, sampler=order, collate_fn=loader.collate_fn, num_workers=0
        )
    metric = datamodule.make_metric()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generated: list[tuple[str, str, str]] = []  # (generation, reference, task) in loader order
    try:
        for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not progress):
            generations = generate_batch(
                model,
                tokenizer,
                batch["prompt_input_ids"].to(device),
                batch["prompt_attention_mask"].to(device),
                max_new_tokens,
                static_cache=compile or static_cache,
                compile=compile,
                graphed_decode=graphed_decode,
            )
            metric.update(generations, batch["references"], batch["task"])
            generated.extend(zip(generations, batch["references"], batch["task"], strict=True))
    finally:
        model.train(was_training)
    value = metric.compute()
    result: dict[str, Any] = {"num_examples": int(metric.total.sum())}
    if isinstance(value, dict):
        result["accuracy"] = float(value["average"])
        result.update({f"accuracy/{task}": float(accuracy) for task, accuracy in value.items() if task != "average"})
    else:
        result["accuracy"] = float(value)
    if return_predictions:
        in_dataset_order: list[dict[str, Any]] = [{} for _ in order]
        for position, (generation, reference, task) in zip(order, generated, strict=True):
            in_dataset_order[position] = {
                "task": task,
                "reference": reference,
                "generation": generation,
                "correct": is_correct(generation, reference, task),
            }
        result["predictions"] = in_dataset_order
    return result
