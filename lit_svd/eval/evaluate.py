"""Standalone generation-based evaluation of a (trained or merged) Hugging Face causal LM.

    for each eval batch (left-padded prompts):
        new_tokens = model.generate(prompt, greedy, KV cache, stop at EOS)[:, prompt_width:]
        metric.update(decode(new_tokens), references, tasks)
    return metric.compute() as floats

The datamodule decides the data, the prompt template and the metric, so ``evaluate(model, tok, dm)``
scores GSM8K, MATH or the commonsense suite the same way the ``LightningModule`` does during validation.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lit_svd.eval.answers import is_correct

__all__ = ["evaluate", "generate_batch"]


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    max_new_tokens: int = 512,
) -> list[str]:
    """Greedy generation for a batch of left-padded prompts.

    Args:
        model: a Hugging Face causal LM (``generate`` with KV cache).
        tokenizer: its tokenizer (EOS and pad ids, decoding).
        prompt_input_ids: (B, P) long, left-padded.
        prompt_attention_mask: (B, P) long, 0 on padding.
        max_new_tokens: generation budget per example; rows stop early at EOS.

    Returns:
        B decoded strings: the new tokens only, special tokens removed.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
) -> dict[str, Any]:
    """Score a model on a datamodule's evaluation set by batched greedy generation.

    Args:
        model: a Hugging Face causal LM (e.g. after ``merge_and_unload()``); it is put in eval mode and its
            device is used.
        tokenizer: the model's tokenizer; handed to the datamodule, which tokenises with it.
        datamodule: an :class:`~lit_svd.data.base.InstructionDataModule` (GSM8K, MATH, MetaMathQA,
            Commonsense); its ``max_eval_examples`` limits the number of questions.
        max_new_tokens: generation budget per question.
        batch_size: questions per ``generate`` call (default: the datamodule's ``eval_batch_size``).
        progress: show a tqdm progress bar.
        return_predictions: also return every question's generation, reference and verdict.

    Returns:
        ``{"accuracy": float, "num_examples": int}`` for single-task metrics; for multi-task metrics
        ``{"accuracy": average, "accuracy/<task>": float, ..., "num_examples": int}``. With
        ``return_predictions``, ``"predictions"`` is a list of ``{"task", "reference", "generation",
        "correct"}`` dicts in dataset order.
    """
    datamodule.set_tokenizer(tokenizer)  # a no-op when it already has this one
    datamodule.setup("test")
    loader = datamodule.eval_dataloader(batch_size)
    metric = datamodule.make_metric()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[dict[str, Any]] = []
    try:
        for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not progress):
            generations = generate_batch(
                model,
                tokenizer,
                batch["prompt_input_ids"].to(device),
                batch["prompt_attention_mask"].to(device),
                max_new_tokens,
            )
            metric.update(generations, batch["references"], batch["task"])
            if return_predictions:
                for generation, reference, task in zip(
                    generations, batch["references"], batch["task"], strict=True
                ):
                    predictions.append(
                        {
                            "task": task,
                            "reference": reference,
                            "generation": generation,
                            "correct": is_correct(generation, reference, task),
                        }
                    )
    finally:
        model.train(was_training)
    value = metric.compute()
    result: dict[str, Any] = {"num_examples": int(metric.total.sum())}
    if isinstance(value, dict):
        result["accuracy"] = float(value["average"])
        result.update(
            {f"accuracy/{task}": float(accuracy) for task, accuracy in value.items() if task != "average"}
        )
    else:
        result["accuracy"] = float(value)
    if return_predictions:
        result["predictions"] = predictions
    return result
