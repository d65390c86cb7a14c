"""A research variant of `LitSVDAdapter`: adapt only the upper decoder layers, train on a per-example loss.

Two hooks are overridden:

- ``adapter_config()`` narrows the user's ``target_modules`` (a list of names) to the decoder layers
  ``>= first_layer`` with a regular expression, so the same YAML/CLI config works for any depth;
- ``compute_loss(batch)`` averages the token loss within each example first and then over examples, so a
  long response no longer outweighs a short one, with optional label smoothing.

Everything else (SVDInit, the SORSA regulariser, SpectralMonitor, checkpoints, export) is inherited.
Used by ``tests/test_docs.py``; shown in ``docs/subclassing.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from lit_svd import AdapterConfig
from lit_svd.module import LitSVDAdapter

__all__ = ["UpperLayersSVDAdapter", "per_example_loss"]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over examples of each example's mean next-token cross-entropy (labels −100 are ignored).

    Args:
        logits: ``(B, T, vocab)`` model outputs.
        labels: ``(B, T)`` token ids, −100 on prompt and padding positions.
        label_smoothing: Passed to ``torch.nn.functional.cross_entropy``.

    Returns:
        A scalar; examples without any response token are left out of the mean.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=-100, reduction="none", label_smoothing=label_smoothing
    )  # (B, T-1), zero where ignored
    counts = (labels != -100).sum(dim=1)  # (B,)
    has_tokens = counts > 0
    return (token_loss.sum(dim=1)[has_tokens] / counts[has_tokens]).mean()


class UpperLayersSVDAdapter(LitSVDAdapter):
    """``LitSVDAdapter`` adapting only decoder layers ``>= first_layer``, with a per-example loss.

    Args:
        *args: ``LitSVDAdapter`` positional arguments (``model``, ``adapter``, …).
        first_layer: Index of the lowest decoder layer to adapt; ``None`` = the upper half.
        label_smoothing: Label smoothing of the training loss.
        **kwargs: ``LitSVDAdapter`` keyword arguments.
    """

    def __init__(self, *args: Any, first_layer: int | None = None, label_smoothing: float = 0.0, **kwargs: Any):
        # adapter_config() runs inside super().__init__ (after the model is loaded, before injection),
        # so everything it reads must be set first. Plain attributes are fine before Module.__init__.
        self.first_layer = first_layer
        self.label_smoothing = label_smoothing
        super().__init__(*args, **kwargs)

    def adapter_config(self) -> AdapterConfig:
        config = super().adapter_config()  # the `adapter` argument
        if isinstance(config.target_modules, str):
            raise ValueError("UpperLayersSVDAdapter needs target_modules as a list of names, e.g. [q_proj, v_proj]")
        depth = self.model.config.num_hidden_layers
        first = depth // 2 if self.first_layer is None else self.first_layer
        if not 0 <= first < depth:
            raise ValueError(f"first_layer must be in [0, {depth}), got {first}")
        layers = "|".join(str(i) for i in range(first, depth))
        names = "|".join(config.target_modules)
        # dataclasses.replace re-runs AdapterConfig's validation on the new value.
        return dataclasses.replace(config, target_modules=rf".*\.layers\.({layers})\..*\.({names})")

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return per_example_loss(out.logits, batch["labels"], self.label_smoothing)
