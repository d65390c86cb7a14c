"""CUDA graphs of the decoder layers for packed training, captured without compilation.

A small model at batch 32 is bound by the host: each decoder layer launches ~100 kernels forward and
backward from Python, while the GPU needs ~1 ms for them. :class:`LayerGraphs` captures every layer's
forward and backward once per input shape with ``torch.cuda.make_graphed_callables`` and replays them, so a
layer costs one graph launch each way. Unlike ``torch.compile`` (``reduce-overhead``) there is nothing to
compile: capturing 30 layers takes a fraction of a second, which matters when a recipe is one short epoch.

A graph replays fixed shapes: pair it with packed rows of a few fixed lengths
(``InstructionDataModule(pack_to_multiple_of=N)``); every new row shape is captured once. Batches that are
not packed, evaluation and generation run the layers eagerly.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["LayerGraphs", "autocast_without_weight_cache"]

GraphCapture = Callable[..., tuple[nn.Module, ...]]
"""``make_graphed_callables(callables, sample_args, num_warmup_iters=, allow_unused_input=, pool=)``."""

_CONSTANT_TYPES = (type(None), bool, int, float, str)


def autocast_without_weight_cache(device_type: str) -> torch.autocast:
    """The autocast state in force (enabled or not, its dtype) with the weight-cast cache off, for a CUDA graph
    capture: a cast cached during the capture would be freed when the autocast region ends, under the graph's
    feet."""
    return torch.autocast(
        device_type,
        dtype=torch.get_autocast_dtype(device_type),
        enabled=torch.is_autocast_enabled(device_type),
        cache_enabled=False,
    )


class _LayerCall(nn.Module):
    """One decoder layer as a function of its tensor arguments; the other arguments are fixed.

    ``make_graphed_callables`` takes a module whose ``forward`` gets tensors only, and graphs the module's
    parameters as static inputs — the layer is a submodule, so they are the layer's.
    """

    def __init__(self, layer: nn.Module, spec: Any, leaves: list[Any], tensor_slots: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.leaves = [None if slot in tensor_slots else leaf for slot, leaf in enumerate(leaves)]
        self.tensor_slots = tensor_slots
        self.train(layer.training)

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors, strict=True):
            leaves[slot] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.layer._call_impl(*args, **kwargs)  # the eager layer: not the graphed call that wraps it


class LayerGraphs:
    """Replays decoder layers' training forward and backward as CUDA graphs, one set per input shape.

    While installed, a layer called in training mode with grad enabled and packed attention arguments
    (``cu_seq_lens_q``) runs its graph; any other call runs the layer as before. At the first call with a
    new shape (of the hidden states, ``cu_seq_lens`` …) all layers are captured together — their inputs
    have the same shapes — sharing one memory pool in forward-then-reverse order, as they run.

    All shapes share one memory pool as well. That is safe because one training step replays the graphs of
    one shape only and consumes everything they return (activations, gradients) before the next step.
    Gradient accumulation over several batches is not: a layer's parameter gradient may *be* its graph's
    output buffer, which the next replay overwrites — :class:`lit_svd.LitSVDAdapter` refuses it. For the
    same reason a layer's output must not be kept from one step to the next. Parameters must change in
    place (the optimizer, ``copy_``): a graph reads them where they were at capture, and a replaced
    parameter is reported, not silently ignored.

    Args:
        layers: the decoder layers, in the order the model calls them.
        capture: ``torch.cuda.make_graphed_callables`` (default) or a stand-in with its signature (tests on
            the CPU use one that returns the callables uncaptured, to check everything around the capture).
        warmup_iters: eager forward/backward passes before each capture (lazy initialisation: cuBLAS
            handles and workspaces, attention plans). One suffices here — the layers' parameters are not
            DDP-wrapped callables (DDP's reducer hooks never fire inside ``make_graphed_callables``), and
            nothing is autotuned; each extra pass costs a whole model's eager forward and backward per new
            shape (3 passes: ~1 s per shape for SmolLM2, ~30 % of a GSM8K epoch's loop).
        max_shapes: at most this many shapes are captured; later new shapes run eagerly, with one warning
            (rows whose length is not rounded to a few values would otherwise capture, and keep, a set of
            graphs per batch).
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        capture: GraphCapture | None = None,
        warmup_iters: int = 1,
        max_shapes: int = 16,
    ) -> None:
        if not layers:
            raise ValueError("LayerGraphs needs at least one decoder layer")
        self.layers = list(layers)
        self.capture = capture
        self.warmup_iters = warmup_iters
        self.max_shapes = max_shapes
        self.eager_calls = 0
        """Layer calls that a graph could have replayed but ran eagerly because ``max_shapes`` was reached."""
        self.graphed: dict[Any, tuple[tuple[bool, ...], tuple[nn.Module, ...]]] = {}
        self._pool: Any = None
        self._installed = False
        self.capture_seconds = 0.0
        """Wall time spent capturing (warm-up passes included), over all shapes."""
        self._storages: list[tuple[int, ...]] | None = None

    @property
    def captures(self) -> int:
        """How many input shapes have been captured (each: every layer's forward and backward graph)."""
        return len(self.graphed)

    def install(self) -> None:
        """Route the layers' calls through :meth:`_call` (nn.Module's hook for compiled calls)."""
        for index, layer in enumerate(self.layers):
            if layer._compiled_call_impl is not None:
                raise ValueError(
                    f"decoder layer {index} ({type(layer).__name__}) is compiled; CUDA-graphed layers and "
                    "compiled layers are alternatives — use one"
                )
        for index, layer in enumerate(self.layers):
            layer._compiled_call_impl = functools.partial(self._call, index)
        self._installed = True

    def remove(self) -> None:
        """Eager layers again; the captured graphs and their memory pool are released."""
        if self._installed:
            for layer in self.layers:
                layer._compiled_call_impl = None
        self._installed = False
        self.graphed.clear()
        self._pool = None
        self._storages = None

    def _call(self, index: int, *args: Any, **kwargs: Any) -> Any:
        layer = self.layers[index]
        if not (args and torch.is_grad_enabled() and layer.training and kwargs.get("cu_seq_lens_q") is not None):
            return layer._call_impl(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        tensor_slots = [slot for slot, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        if tensor_slots[0] != 0 or any(
            not isinstance(leaves[slot], _CONSTANT_TYPES) for slot in range(len(leaves)) if slot not in tensor_slots
        ):
            return layer._call_impl(*args, **kwargs)  # e.g. a KV cache object: nothing a graph can replay
        if any(leaves[slot].requires_grad for slot in tensor_slots[1:]):
            return layer._call_impl(*args, **kwargs)  # only the hidden states may carry a gradient
        key = (
            spec,
            tuple(leaf for slot, leaf in enumerate(leaves) if slot not in tensor_slots),
            tuple((tuple(leaves[slot].shape), leaves[slot].dtype, leaves[slot].device) for slot in tensor_slots),
            torch.get_autocast_dtype(leaves[0].device.type)
            if torch.is_autocast_enabled(leaves[0].device.type)
            else None,
        )
        if key not in self.graphed and len(self.graphed) >= self.max_shapes:
            if self.eager_calls == 0:
                warnings.warn(
                    f"LayerGraphs: {self.max_shapes} input shapes captured already; this new one "
                    f"{tuple(leaves[0].shape)} and any later ones run eagerly. Round packed rows up to a few "
                    "lengths (pack_to_multiple_of) so that a training epoch has few shapes",
                    stacklevel=2,
                )
            self.eager_calls += 1
            return layer._call_impl(*args, **kwargs)
        if key not in self.graphed:
            started = time.perf_counter()
            self.graphed[key] = self._capture(index, spec, leaves, tensor_slots)
            self.capture_seconds += time.perf_counter() - started
        input_requires_grad, graphed = self.graphed[key]
        self._check_parameters_in_place(index)
        hidden = leaves[0]
        if hidden.requires_grad and not input_requires_grad[index]:
            raise RuntimeError(
                f"decoder layer {index} was captured with hidden states that need no gradient, but now they "
                "do: its graph would drop the gradient. Did parameters become trainable after training started?"
            )
        return graphed[index](*(leaves[slot] for slot in tensor_slots))

    def _check_parameters_in_place(self, index: int) -> None:
        # A graph reads its parameters at the addresses they had at capture. The optimizer updates them in
        # place; code that *replaces* one (``p.data = …``, a new Parameter) would leave the graph training
        # the old tensor, silently.
        storages = tuple(p.data_ptr() for p in self.layers[index].parameters())
        if self._storages[index] != storages:
            names = [name for name, _ in self.layers[index].named_parameters()]
            captured = self._storages[index]
            changed = next((n for n, a, b in zip(names, captured, storages, strict=False) if a != b), "a parameter")
            raise RuntimeError(
                f"decoder layer {index}: parameter '{changed}' was replaced after its CUDA graph was captured "
                "(the graph would keep reading the old tensor); update parameters in place (copy_, the "
                "optimizer) or call LayerGraphs.remove() and install() again"
            )

    def _capture(
        self, index: int, spec: Any, leaves: list[Any], tensor_slots: list[int]
    ) -> tuple[tuple[bool, ...], tuple[nn.Module, ...]]:
        hidden = leaves[0]
        capture = self.capture
        if capture is None:
            if hidden.device.type != "cuda":
                raise ValueError(f"CUDA-graphed layers need a CUDA device; the hidden states are on {hidden.device}")
            capture = torch.cuda.make_graphed_callables
        # Layer j's input needs a gradient if anything before it is trainable; the first layer called
        # tells whether the embeddings are.
        upstream = hidden.requires_grad
        input_requires_grad = []
        for position, layer in enumerate(self.layers):
            if position == index:
                upstream = hidden.requires_grad
            input_requires_grad.append(upstream)
            upstream = upstream or any(p.requires_grad for p in layer.parameters())
        if self._storages is None:
            self._storages = [tuple(p.data_ptr() for p in layer.parameters()) for layer in self.layers]
        calls = tuple(_LayerCall(layer, spec, leaves, tensor_slots) for layer in self.layers)
        others = tuple(leaves[slot] for slot in tensor_slots[1:])
        sample_args = tuple(
            (hidden.detach().clone().requires_grad_(requires_grad), *others) for requires_grad in input_requires_grad
        )
        if self._pool is None and capture is torch.cuda.make_graphed_callables:
            self._pool = torch.cuda.graph_pool_handle()
        with autocast_without_weight_cache(hidden.device.type):  # make_graphed_callables refuses the cache
            graphed = capture(
                calls, sample_args, num_warmup_iters=self.warmup_iters, allow_unused_input=True, pool=self._pool
            )
        return tuple(input_requires_grad), tuple(graphed)
