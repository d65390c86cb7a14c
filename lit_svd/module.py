"""`LitSVDAdapter`: the LightningModule that fine-tunes a Hugging Face causal LM with an SVD-family adapter.

Thin glue over ``lit_svd.inject``: the constructor loads the model and injects *uninitialised* adapters;
the ``SVDInit`` callback initialises them on the accelerator at fit start (added automatically if
missing). Checkpoints hold only adapter tensors plus optimizer/scheduler state.

Overridable hooks for research code (see ``docs/subclassing.md``):

- ``adapter_config()``: the ``AdapterConfig`` to inject (default: the ``adapter`` argument);
- ``inject(model)``: how adapters get into the model (default: ``inject_adapters(..., initialize=False)``);
- ``compute_loss(batch)``: the training loss (default: masked LM loss, labels −100 ignored);
- ``regularizer()``: the term SORSA's step back-propagates after clipping (default: ``L_orth``);
- ``generate_answers(batch)``: decoded generations for evaluation batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel

from lit_svd.adapters import get_adapter_class
from lit_svd.attention import checkpoint_context_fn, enable_activation_checkpointing
from lit_svd.config import AdapterConfig
from lit_svd.data import non_padding_tokens
from lit_svd.eval.evaluate import generate_batch
from lit_svd.export import export_merged, export_peft_lora
from lit_svd.graphs import LayerGraphs
from lit_svd.inject import (
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    is_sharded,
    load_adapter_state_dict,
    move_if_it_fits,
    orthonormal_factor_groups,
    orthonormal_regularizer,
)
from lit_svd.kernels import apply_liger_kernels
from lit_svd.linalg import full_tensor, local_tensor, orthonormality_error_and_gradient
from lit_svd.losses import causal_lm_batch_loss
from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer

__all__ = ["LitSVDAdapter"]

_CHECKPOINT_KEY = "lit_svd"
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""inductor's ``torch.compile`` modes."""
_COMPILE_MODES = get_args(CompileMode)


class LitSVDAdapter(LightningModule):
    """Fine-tune a causal LM with a lit_svd adapter.

    Args:
        model: Hub id, local directory, ``.gguf`` path, ``"embedded:SmolLM2-135M-Instruct"`` (the
            offline default) or a ready ``PreTrainedModel``.
        adapter: Method, rank, targets, γ … (``AdapterConfig``).
        gguf_file: GGUF file name inside ``model`` when it is a directory.
        model_dtype: Dtype to load the base weights in (``"bfloat16"``, ``"float32"``…; ``None`` = default).
        tokenizer: Tokenizer path/id if it differs from ``model``.
        learning_rate: AdamW learning rate of the adapter parameters.
        singular_value_lr: Separate learning rate for singular values (SORSA/OSoRA ``S``); ``None`` = same.
        weight_decay: AdamW weight decay (not applied to singular values).
        betas: AdamW betas.
        scheduler: ``"cosine"``, ``"linear"`` (both decay to 0 after warmup) or ``"constant"``.
        warmup_ratio: Fraction of the total optimizer steps spent in linear warmup.
        max_new_tokens: Generation length for evaluation.
        static_cache_generation: evaluation generates with a preallocated (static) KV cache, written in place
            instead of grown by concatenation each step; not compiled. Same outputs; 2.32× HF ``generate``'s
            tokens/s against 1.77× for the default dynamic cache on a 7B-shaped model (docs/performance.md §4).
        graphed_generation: evaluation decodes greedily with a static cache and the decoding step captured as
            a CUDA graph (:func:`lit_svd.eval.greedy_decode`; no compilation, eager on the CPU). Same outputs
            as ``generate`` with a static cache; not with FSDP (its sharded weights are gathered per forward).
        gradient_checkpointing: Trade compute for memory in the base model.
        compile: ``torch.compile`` each decoder layer for training (``dynamic=True``; all layers share one
            compiled graph, so compilation costs about one layer's). Training of a small model is bound by
            Python dispatch, which compiled layers remove, and so is a checkpointed 4-bit 7B step: 1.31–1.79×
            PEFT QLoRA's tokens/s (docs/quantization.md). With ``gradient_checkpointing`` the checkpoint wraps
            the compiled layer. Pair it with packed rows of few shapes (``pack_to_multiple_of``): padded
            batches recompile the layer as their shapes change. Validation, generation and everything after
            ``fit`` run eager.
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` needs no compiler;
            ``"cudagraphs"``: CUDA graphs of the un-fused layer, no code generation).
        compile_mode: inductor's mode, e.g. ``"reduce-overhead"``: CUDA graphs, one per row shape, which
            replay a layer's kernels without launching each from Python (pair it with the data module's
            ``pack_to_multiple_of`` so that rows come in a few fixed shapes). ``None``: inductor's default.
        cuda_graph_layers: replay each decoder layer's training forward and backward as CUDA graphs
            captured with ``torch.cuda.make_graphed_callables`` (``lit_svd.graphs``): no compilation, one
            capture per packed-row shape — pair it with ``pack_sequences`` and ``pack_to_multiple_of``. CUDA
            only; not with ``compile`` or gradient accumulation.
        liger_kernels: on CUDA devices, Liger Kernel's Triton RMSNorm, SwiGLU and RoPE in the model and its
            fused linear cross-entropy as the loss head (``lit_svd.kernels``; 1.29× the tokens/s of a
            7B-shaped model on an H200, less memory). Needs ``pip install liger-kernel`` and a model family
            Liger knows (Llama, Qwen2, Mistral, …); on a CPU it warns and changes nothing. With ``compile``
            only the loss head is Liger's (inductor fuses the layers itself).
        on_nonfinite: what a step whose gradients hold a NaN or Inf (e.g. from a non-finite loss) does:
            ``"error"`` stops the run with ``FloatingPointError`` naming the step, the loss and the first
            parameter affected, before the optimizer step, so the adapters and the last checkpoint stay
            good; ``"skip"`` drops that step's update (the learning-rate schedule moves on) and counts it
            in ``train/skipped_steps``. Either way a checkpoint is never written with non-finite adapter
            tensors. The check costs one host sync per optimizer step, taken after clipping and the
            regulariser are queued.
    """

    layer_graph_capture: Callable[..., Any] | None = None
    """What captures the layer graphs (``None``: ``torch.cuda.make_graphed_callables``); tests replace it."""

    def __init__(
        self,
        model: str | PreTrainedModel = EMBEDDED_MODEL,
        adapter: AdapterConfig | None = None,
        gguf_file: str | None = None,
        model_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 2e-4,
        singular_value_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        warmup_ratio: float = 0.03,
        max_new_tokens: int = 256,
        static_cache_generation: bool = False,
        graphed_generation: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: CompileMode | None = None,
        cuda_graph_layers: bool = False,
        liger_kernels: bool = False,
        on_nonfinite: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        problems = []
        if on_nonfinite not in ("error", "skip"):
            problems.append(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        if learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {learning_rate}")
        if singular_value_lr is not None and singular_value_lr <= 0:
            problems.append(f"singular_value_lr must be > 0 or None, got {singular_value_lr}")
        if not 0 <= warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if compile_mode is not None:
            if compile_mode not in _COMPILE_MODES:
                problems.append(
                    f"compile_mode must be one of {', '.join(_COMPILE_MODES)} or None, got {compile_mode!r}"
                )
            if compile_backend != "inductor":
                problems.append(f"compile_mode is an inductor option; compile_backend is {compile_backend!r}")
        if cuda_graph_layers and gradient_checkpointing:
            problems.append(
                "cuda_graph_layers and gradient_checkpointing cannot be combined (a graphed layer replays a "
                "captured forward and backward; checkpointing re-runs the forward inside the backward): use one"
            )
        if cuda_graph_layers and compile:
            problems.append(
                "cuda_graph_layers and compile are alternatives (both remove per-kernel host work); use one"
            )
        if problems:
            raise ValueError("invalid LitSVDAdapter arguments: " + "; ".join(problems))
        if isinstance(adapter, dict):  # as stored in checkpoints' hyper-parameters
            adapter = AdapterConfig(**adapter)
        self._adapter = adapter or AdapterConfig()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, PreTrainedModel) else None)
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["adapter"] = dataclasses.asdict(self._adapter)
        if isinstance(model, PreTrainedModel):
            self.model_name = getattr(model, "name_or_path", "") or ""
            self.model = model
            self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        else:
            self.model_name = model
            self.model = load_causal_lm(model, gguf_file=gguf_file, dtype=model_dtype)
            self.tokenizer = load_tokenizer(tokenizer or model, gguf_file=None if tokenizer else gguf_file)
        if gradient_checkpointing:
            # context_fn: a packed batch's recomputation (in backward) must run the packed attention again.
            kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(_transformers_model(self.model))}
            enable_activation_checkpointing(self.model, kwargs)
            self.model.enable_input_require_grads()
        self.model = self.inject(self.model)
        self.metric = None
        self._tokens_seen = 0
        self._step_started: float | None = None
        self._last_loss: torch.Tensor | None = None
        self._loss_on_host: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._loss_shown: float | None = None
        self.skipped_steps = 0
        self._orthonormal_plan: tuple[torch.optim.Optimizer, list] | None = None
        self._layer_graphs: LayerGraphs | None = None
        self._liger_active = False
        self._specialize_float_before: bool | None = None  # dynamo's setting while the layers are compiled
        self._checkpointed_around_compiled: list[torch.nn.Module] = []
        # The base model is frozen and not saved; Lightning must not insist on its keys when loading.
        self.strict_loading = False

    # ----- overridable hooks ------------------------------------------------------------------------------
    def adapter_config(self) -> AdapterConfig:
        """The adapter configuration to inject; override to derive it programmatically."""
        return self._adapter

    def inject(self, model: PreTrainedModel) -> PreTrainedModel:
        """Put the (uninitialised) adapters into ``model``; ``SVDInit`` initialises them at fit start."""
        return inject_adapters(model, self.adapter_config(), initialize=False)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked causal-LM loss: mean cross-entropy over tokens whose label is not −100.

        Padded batches (``attention_mask``) and packed ones (``cu_seq_lens``, see ``lit_svd.attention``) give
        the same value. The head and the cross-entropy run only on labelled positions, fused and chunked
        (``lit_svd.losses``), unless the model post-processes its logits (soft-capping, logit scaling).
        """
        kernel = "liger" if self._liger_active else "lit_svd"
        return causal_lm_batch_loss(_transformers_model(self.model), batch, kernel=kernel)

    def regularizer(self) -> torch.Tensor:
        """SORSA's orthonormal regulariser ``L_orth`` (zero for the other methods)."""
        return orthonormal_regularizer(self.model)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy, KV-cached generation for the batch's left-padded prompts; returns the decoded continuations."""
        if self.tokenizer is None:
            raise ValueError("generation needs a tokenizer; pass tokenizer= to LitSVDAdapter")
        return generate_batch(
            self.model,
            self.tokenizer,
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            static_cache=bool(self.hparams.get("static_cache_generation")),
            compile=False,
            graphed_decode=self._graphed_generation(),
        )

    def use_liger_kernels(self) -> None:
        """Swap in Liger's RMSNorm, SwiGLU and RoPE kernels and its fused linear cross-entropy now — what
        ``liger_kernels=True`` does in ``setup`` of a fit on a CUDA device — for loops outside a Trainer.

        With ``compile=True`` only the loss head is Liger's: inductor fuses the layers' normalisations, rotary
        embedding and gate itself, and dynamo cannot trace Liger's RMSNorm (the compiled layer would fail).
        """
        if not self._liger_active:
            if not self.hparams.get("compile"):
                apply_liger_kernels(_transformers_model(self.model))
            self._liger_active = True

    def compile_decoder_layers(self) -> None:
        """``torch.compile`` every decoder layer with the module's ``compile_backend``/``compile_mode`` now —
        what ``compile=True`` does when a fit starts — for loops outside a Trainer; undone by
        :meth:`uncompile_decoder_layers`.

        With gradient checkpointing, the checkpoint stays eager *around* the compiled layer: the layer's own
        checkpoint function (``_gradient_checkpointing_func``, set up with the ``context_fn`` that restores a
        packed batch's attention, :func:`checkpoint_context_fn`) wraps the compiled call, while transformers'
        checkpointing inside the layer steps aside. The compiled forward runs again inside the backward. A
        checkpoint traced *inside* the compiled layer (what ``layer.compile()`` gives under transformers ≥ 5.2x,
        whose checkpointing wraps ``forward``) takes no such ``context_fn``, and would recompute a packed
        batch with the model's own attention whenever dynamo gave up on the layer.
        """
        if self._specialize_float_before is not None:
            return
        # Under dynamic=True dynamo passes a layer's float attributes (RMSNorm's eps) in as 0-dim *CPU*
        # tensors; one CPU input keeps the whole layer out of CUDA graphs (reduce-overhead, the cudagraphs
        # backend) and adds a host-side kernel to every call. A layer's floats never change, so they are
        # traced as constants. Set for the whole of training (whoever calls the layers), like the stance.
        self._specialize_float_before = torch._dynamo.config.specialize_float
        torch._dynamo.config.specialize_float = True
        for layer in decoder_layers(self.model):
            compiled = torch.compile(
                layer._call_impl,
                dynamic=True,
                backend=self.hparams.compile_backend,
                mode=self.hparams.get("compile_mode"),
            )
            if getattr(layer, "gradient_checkpointing", False):
                layer.gradient_checkpointing = False
                self._checkpointed_around_compiled.append(layer)
                compiled = functools.partial(_checkpointed_call, layer, compiled)
            layer._compiled_call_impl = compiled

    def uncompile_decoder_layers(self) -> None:
        """Run the decoder layers eagerly again, checkpointed by transformers where they were before."""
        if self._specialize_float_before is None:
            return
        for layer in decoder_layers(self.model):
            layer._compiled_call_impl = None
        for layer in self._checkpointed_around_compiled:
            layer.gradient_checkpointing = True
        self._checkpointed_around_compiled = []
        torch._dynamo.config.specialize_float = self._specialize_float_before
        self._specialize_float_before = None

    def _graphed_generation(self) -> bool:
        if not self.hparams.get("graphed_generation"):
            return False
        if is_sharded(self.model):
            raise ValueError(
                "graphed_generation cannot capture a sharded (FSDP) model's decoding step: its weights are "
                "all-gathered inside every forward; use static_cache_generation instead"
            )
        return True

    # ----- Lightning hooks --------------------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def configure_callbacks(self) -> list[Callback]:
        from lit_svd.callbacks import SVDInit

        # Only fitting initialises adapters; validate/test run on a restored (or deliberately untouched) model.
        if self.trainer.state.fn != "fit" or any(isinstance(cb, SVDInit) for cb in self.trainer.callbacks):
            return []
        rank_zero_warn("no SVDInit callback given: LitSVDAdapter adds one so adapters are initialised at fit start")
        return [SVDInit()]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # from_pretrained leaves HF models in eval mode; adapter dropout must be active in training.
            self.model.train()
        if self.hparams.get("liger_kernels") and not self._liger_active:
            device = self.trainer.strategy.root_device
            if device.type == "cuda":
                self.use_liger_kernels()
            else:
                rank_zero_warn(
                    f"liger_kernels=True: Liger's kernels are Triton kernels for CUDA GPUs; this run is on {device}, "
                    "so PyTorch's modules and lit_svd's chunked loss stay"
                )
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            if hasattr(datamodule, "set_tokenizer") and self.tokenizer is not None:
                datamodule.set_tokenizer(self.tokenizer)
            if self.metric is None and hasattr(datamodule, "make_metric"):
                self.metric = datamodule.make_metric()

    def _continue_the_data_where_the_checkpoint_left_it(self) -> None:
        """Hand the training loader its saved position when Lightning built the loader before restoring it.

        ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the schedule's length), which in an
        epoch-based fit (``max_steps=-1``) builds the training loader, and starts its iterator, before the
        checkpoint's loop state is restored; Lightning then neither gives the loader its saved state nor starts a
        new iterator, and a run resumed mid-epoch would replay its epoch from the first batch. This does what
        Lightning does when it builds the loader after the restore: the epoch, the saved state, a new iterator.
        """
        if self._trainer is None:  # hooks called by hand, outside a fit
            return
        loop = self._trainer.fit_loop
        if not loop._combined_loader_states_to_load or loop._combined_loader is None or not loop.restarting:
            return
        for loader in loop._combined_loader.flattened:
            _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
        loop._load_combined_loader_states()
        iter(loop._data_fetcher)

    def on_train_start(self) -> None:
        self._continue_the_data_where_the_checkpoint_left_it()
        if self.hparams.get("compile"):
            self.compile_decoder_layers()
        if self.hparams.get("cuda_graph_layers"):
            if self.trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"cuda_graph_layers cannot accumulate gradients (accumulate_grad_batches="
                    f"{self.trainer.accumulate_grad_batches}): a layer's gradient is its graph's output buffer, "
                    "overwritten by the next batch's replay"
                )
            if self.layer_graph_capture is None and self.device.type != "cuda":
                raise ValueError(f"cuda_graph_layers needs a CUDA device; this module is on {self.device}")
            datamodule = getattr(self.trainer, "datamodule", None)
            if getattr(datamodule, "pack_sequences", True) is False:
                rank_zero_warn(
                    "cuda_graph_layers replays packed batches only, and the data module does not pack "
                    "(pack_sequences=False): every decoder layer will run eagerly"
                )
            elif datamodule is not None and getattr(datamodule, "pack_to_multiple_of", 0) is None:
                rank_zero_warn(
                    "cuda_graph_layers captures each packed-row length once, and without pack_to_multiple_of "
                    "almost every batch has a length of its own; set it (e.g. 2048) to get a few lengths"
                )
            self._layer_graphs = LayerGraphs(decoder_layers(self.model), capture=self.layer_graph_capture)
            self._layer_graphs.install()
        pending = [name for name, layer in adapter_layers(self.model) if not bool(layer.initialized)]
        if pending:
            raise RuntimeError(
                f"{len(pending)} adapter(s) are not initialised (e.g. '{pending[0]}'): an uninitialised SVD "
                "adapter must never train; add the SVDInit callback or call initialize_adapters(model)"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self._last_loss = loss.detach()
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, batch_size=batch_size)
        self._show_in_progress_bar(loss.detach(), batch_size)
        # A device tensor, not int(mask.sum()): a host sync every step would stall the queue of kernels.
        self._tokens_seen = self._tokens_seen + non_padding_tokens(batch)
        return loss

    def _show_in_progress_bar(self, loss: torch.Tensor, batch_size: int) -> None:
        """Show the loss in the progress bar (as ``loss``) without a host sync.

        Lightning turns every progress-bar value into a float at each batch end (``.item()``), which on a GPU
        waits for the step's whole queue, the optimizer step included, so the host cannot queue the next batch
        while the GPU works. On a GPU the bar shows the latest loss that has already reached the host: each
        step's loss is copied to pinned memory without blocking and read at a later step, once its copy is done.
        """
        if loss.device.type != "cuda":
            self._loss_shown = float(loss)
        else:
            if self._loss_on_host is None:
                self._loss_on_host = (torch.empty((), dtype=torch.float32, pin_memory=True), torch.cuda.Event())
            elif self._loss_on_host[1].query():  # the previous copy is done
                self._loss_shown = float(self._loss_on_host[0])
            buffer, copied = self._loss_on_host
            buffer.copy_(loss.float(), non_blocking=True)
            copied.record()
        if self._loss_shown is not None:
            # A CPU tensor: Lightning would move a Python float to the GPU, itself a sync.
            self.log("loss", torch.tensor(self._loss_shown), prog_bar=True, logger=False, batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_started is None:
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Numbers are logged as CPU tensors: Lightning puts a Python number on the module's device, which on a
        # GPU waits for the step's queue and keeps the host from queuing the next batch meanwhile.
        if self.skipped_steps:
            self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0 and self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            if elapsed > 0:
                rate = self._tokens_seen / elapsed  # a device tensor for padded batches, a number for packed ones
                self.log("train/tokens_per_second", rate if isinstance(rate, torch.Tensor) else torch.tensor(rate))
            self._tokens_seen, self._step_started = 0, None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the task gradient, *then* add SORSA's regulariser gradient scaled by γ/η_t (SPEC §3).

        Lightning calls this once per optimizer step (after gradient accumulation, after
        ``on_before_optimizer_step``), right before ``optimizer.step()``.
        """
        # The verdict on the gradients is computed on the device first and read by the host last: reading it
        # waits for the backward, and whatever the host queues before that (clipping, the regulariser's
        # gradient) runs on the GPU straight after it. Read first, a 7B step's ~30 ms of step work was issued
        # kernel by kernel to an idle GPU (docs/distributed.md, "Where a 7B step's time goes").
        verdict = self._nonfinite_gradients(optimizer)
        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and isinstance(plugin, MixedPrecision)
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and not self._loss_scaled()
        ):
            # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients inside
            # its step (the fused AdamW), a guard for float16's loss scale; bf16-mixed has none, so the clip is
            # the plain one, which the guard's base class does.
            Precision.clip_gradients(
                plugin,
                optimizer,
                gradient_clip_val,
                GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM),
            )
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.apply_regularizer_gradient(optimizer)
        if verdict is not None:
            self._apply_on_nonfinite(optimizer, *verdict)

    def _loss_scaled(self) -> bool:
        """Whether a float16 ``GradScaler`` scales the loss (its gradients are unscaled before clipping)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def _nonfinite_gradients(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
        """This step's gradient verdict, on the device, without a host sync: ``(parameters, flags, count)``.

        ``flags[i]`` is 1 where ``parameters[i]``'s (local) gradient holds a NaN or Inf, taken *before* clipping
        (which spreads one NaN to every gradient), so a failure can name the parameter; ``count`` is the number
        of ranks that saw one (under DDP the gradients are already all-reduced, so every rank decides alike;
        FSDP's shards are checked on each rank and the count summed across ranks). ``None``: nothing to check
        (no gradients, or a float16 ``GradScaler``, which skips overflowing steps itself).
        """
        if self._loss_scaled():
            return None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return None
        # One foreach norm per device and dtype (what clip_grad_norm_ computes too): a NaN or Inf anywhere in a
        # gradient makes its norm non-finite.
        norms = torch._foreach_norm([local_tensor(p.grad) for p in params])
        flags = (~torch.isfinite(torch.stack([n.float() for n in norms]))).float()
        count = flags.amax()
        if is_sharded(self.model):
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return params, flags, count

    def _apply_on_nonfinite(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], flags: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Read the verdict (the step's one host sync) and apply ``on_nonfinite``: error, or drop the update."""
        if not bool(count):
            return
        step = self.trainer.global_step
        loss = float(self._last_loss) if self._last_loss is not None else float("nan")
        if self.hparams.get("on_nonfinite", "error") == "skip":
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            self.skipped_steps += 1
            rank_zero_warn(f"step {step}: non-finite gradient (loss {loss:.6g}); the update is skipped")
            return
        names = {id(p): n for n, p in self.named_parameters()}
        bad = flags.nonzero().flatten().tolist()
        first = names.get(id(params[bad[0]]), "?") if bad else "(a parameter sharded to another rank)"
        raise FloatingPointError(
            f"step {step}: non-finite gradient (loss {loss:.6g}; first parameter affected: {first}); the run "
            "stopped before the optimizer step, so the adapters and the last checkpoint are unchanged. "
            "Lower the learning rate, check the data, or pass --model.on_nonfinite skip"
        )

    def apply_regularizer_gradient(self, optimizer: torch.optim.Optimizer) -> None:
        """Add ``∇ (γ/η_t)·L_orth`` to the factors' gradients; η_t is the current LR of their param group."""
        gamma = self.adapter_config().gamma
        if gamma == 0:
            return
        if type(self).regularizer is LitSVDAdapter.regularizer and not is_sharded(self.model):
            self._apply_orthonormal_gradient(optimizer, gamma)
            return
        with torch.enable_grad():
            value = self.regularizer()
        if not value.requires_grad:
            return
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        # At lr = 0 (end of a decayed schedule) no step is taken, so the regulariser is skipped too.
        factors = [p for p in self.model.parameters() if p.requires_grad and lr_of.get(id(p), 0) > 0]
        if not factors:
            return
        grads = torch.autograd.grad(value, factors, allow_unused=True)
        _add_scaled_gradients(
            ((p, g, lr_of[id(p)]) for p, g in zip(factors, grads, strict=True) if g is not None), gamma
        )
        self._log_orthonormality(value.detach())

    def _log_orthonormality(self, value: torch.Tensor) -> None:
        if self._trainer is not None:  # outside a fit (a bench, a research loop) there is no logger
            self.log("train/orthonormality", value)

    @torch.no_grad()
    def _apply_orthonormal_gradient(self, optimizer: torch.optim.Optimizer, gamma: float) -> None:
        """``apply_regularizer_gradient`` for the default ``L_orth``, its gradient in closed form.

        The same values as back-propagating :func:`~lit_svd.inject.orthonormal_regularizer`, without walking
        the model or recording a graph each step: a small model's step is bound by the host, and autograd
        over a few hundred stacked factors cost it several milliseconds (docs/performance.md §5).
        """
        plan = self._orthonormal_plan
        if plan is None or plan[0] is not optimizer:
            plan = (optimizer, orthonormal_factor_groups(self.model, optimizer))
            self._orthonormal_plan = plan
        groups = plan[1]
        if not groups:
            return
        count = sum(len(factors) for _, factors in groups)
        errors, updates = [], []
        for group_index, factors in groups:
            error, gradient = orthonormality_error_and_gradient(torch.stack(factors).float())
            errors.append(error)
            lr = optimizer.param_groups[group_index]["lr"] if group_index is not None else 0
            if lr <= 0:  # not trained, or at lr = 0 (no step is taken, so the regulariser is skipped too)
                continue
            gradient = (gradient / count).to(factors[0].dtype)
            updates.extend((p, g, lr) for p, g in zip(factors, gradient.unbind(0), strict=True))
        _add_scaled_gradients(updates, gamma)
        self._log_orthonormality(torch.cat(errors).mean())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        singular_ids = {
            id(getattr(layer, name))
            for _, layer in adapter_layers(self.model)
            for name in layer.trainable_names
            if name == "S"
        }
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        singular = [p for p in trainable if id(p) in singular_ids]
        other = [p for p in trainable if id(p) not in singular_ids]
        groups = [{"params": other, "weight_decay": hp.weight_decay, "lr": hp.learning_rate}]
        if singular:
            groups.append({"params": singular, "weight_decay": 0.0, "lr": hp.singular_value_lr or hp.learning_rate})
        groups = [g for g in groups if g["params"]]
        # PyTorch's default AdamW (foreach). The fused one was measured on a 7B model (320 M float32 adapter
        # parameters, SORSA r=128, one H200): the optimizer step phase took 35–41 ms GPU per step with it and
        # 32 ms without (docs/distributed.md), so it is not the default; a subclass may return it (clipping
        # under bf16-mixed handles it, see configure_gradient_clipping).
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_ratio * total)
        scheduler = LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total, hp.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.hparams.get("compile"):
            # Back to eager: generation and evaluation after fit would otherwise compile graphs of their own.
            self.uncompile_decoder_layers()
        if self._layer_graphs is not None:
            self._layer_graphs.remove()
            self._layer_graphs = None

    def on_validation_start(self) -> None:
        if self.hparams.get("compile"):
            torch.compiler.set_stance("force_eager")  # generation shapes would recompile the layers

    def on_validation_end(self) -> None:
        if self.hparams.get("compile"):
            torch.compiler.set_stance("default")

    def _evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        batch_size = batch["input_ids"].shape[0] if "input_ids" in batch else len(batch.get("references", [1]))
        if "labels" in batch:
            self.log(f"{stage}/loss", self.compute_loss(batch), batch_size=batch_size, sync_dist=True)
        if "references" in batch and self.metric is not None:
            self.metric.update(self.generate_answers(batch), batch["references"], batch.get("task"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, "test")

    def _log_metric(self, stage: str) -> None:
        if self.metric is None or not getattr(self.metric, "update_count", 1):
            return
        value = self.metric.compute()
        values = value if isinstance(value, dict) else {"accuracy": value}
        for key, v in values.items():
            self.log(f"{stage}/{key}", v, rank_zero_only=False)
        self.metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val")

    def on_test_epoch_end(self) -> None:
        self._log_metric("test")

    # ----- adapter-only checkpoints ----------------------------------------------------------------------
    def _checkpoint_metadata(self) -> dict[str, Any]:
        config = self.adapter_config()
        # Method options the adapter tensors do not record (VeRA's seed: its projections are re-derived from it).
        options = {f: getattr(config, f) for f in get_adapter_class(config.method).config_options}
        return {"method": config.method, "rank": config.rank, "model": str(self.model_name), "version": 1} | options

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = adapter_state_dict(self.model)
        # Refused before anything is written, so the previous checkpoint stays the last good one. Each rank
        # checks what it holds (FSDP: its shards) and all ranks learn whether any found a NaN or Inf.
        floats = {k: local_tensor(v) for k, v in state.items() if v.is_floating_point()}
        # One fused norm (one host sync): a NaN or Inf anywhere makes it non-finite.
        count = (~torch.isfinite(torch.nn.utils.get_total_norm(list(floats.values())))).float()
        if is_sharded(self.model):
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        if bool(count):
            bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]  # names: failure path only
            step = self.trainer.global_step if self._trainer is not None else "?"
            listed = ", ".join(bad[:5]) + (" …" if len(bad) > 5 else "") if bad else "(on another rank)"
            raise ValueError(f"not writing a checkpoint at step {step}: non-finite adapter tensor(s) {listed}")
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in state.items()}
        checkpoint[_CHECKPOINT_KEY] = self._checkpoint_metadata() | {"skipped_steps": self.skipped_steps}
        if self._trainer is not None:
            from lit_svd.callbacks.checkpoint import reopen_cut_epoch

            reopen_cut_epoch(self._trainer, checkpoint)  # a run stopped by max_steps resumes mid-epoch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("not a lit_svd checkpoint (no 'lit_svd' metadata); was it written by LitSVDAdapter?")
        current = self._checkpoint_metadata()
        mismatches = [
            f"{k}: checkpoint {saved.get(k)!r} vs this module {current[k]!r}"
            for k in ("method", "rank", "model", *sorted(current.keys() - {"method", "rank", "model", "version"}))
            if saved.get(k) != current[k]
        ]
        if mismatches:
            raise ValueError("checkpoint does not match this LitSVDAdapter: " + "; ".join(mismatches))
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        # Lightning restores before the strategy moves the model (DDP) or shards it (FSDP): the residuals
        # are rebuilt on the accelerator, the whole model moved there first where it fits (DDP moves it
        # next anyway), else each layer visiting it.
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        move_if_it_fits(self.model, device)
        load_adapter_state_dict(self.model, state, device=device)
        # Already loaded (with residual rebuilding); Lightning's own load_state_dict gets nothing to do.
        checkpoint["state_dict"] = {}

    # ----- export ------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors (``adapter_state_dict``) as full tensors, also when FSDP shards them.

        Under FSDP this all-gathers each adapter tensor (never a base weight), so every rank must call it.
        """
        return {k: full_tensor(v) for k, v in adapter_state_dict(self.model).items()}

    @contextlib.contextmanager
    def export_placement(self, device: torch.device | str | None = None) -> Iterator[None]:
        """Run exports on the accelerator: after ``fit`` Lightning has moved the model back to the host, where
        merging a 7B model's weights or the float64 SVDs of its PEFT factors takes minutes (on one CPU thread
        under ``torchrun``) rather than seconds. A model that fits in 60 % of the free device memory goes
        there whole for the block and back afterwards; a larger one stays, and each layer visits the device
        in turn (the exports' ``device``). Nested uses move nothing. ``device``: the accelerator (default: the
        trainer's, if it is not the CPU)."""
        device = torch.device(device) if device is not None else self._export_device()
        home = next(self.model.parameters()).device
        move = home != device and move_if_it_fits(self.model, device)
        try:
            yield
        finally:
            if move:
                self.model.to(home)

    def _export_device(self) -> torch.device | None:
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        return device if device is not None and device.type != "cpu" else None

    def _exportable_model(self) -> torch.nn.Module | None:
        """The model to export on rank 0 (``None`` on the other ranks): ``self.model``, or under FSDP a fresh
        copy of the original base with the gathered adapter loaded onto it (residuals rebuilt as on resume)."""
        rank = self._trainer.global_rank if self._trainer is not None else 0
        if not is_sharded(self.model):
            return self.model if rank == 0 else None  # every rank holds the same model; one writes it
        state = self.adapter_state()  # collective: every rank
        if rank != 0:
            return None
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError("exporting a sharded model reloads the base by name; this module was given a model object")
        hp = self.hparams
        fresh = load_causal_lm(self.model_name, gguf_file=hp.get("gguf_file"), dtype=hp.get("model_dtype"))
        fresh = self.inject(fresh)
        device = self._export_device()
        move_if_it_fits(fresh, device)
        load_adapter_state_dict(fresh, state, device=device)
        return fresh

    def export_merged(self, path: str | Path, overwrite: bool = False) -> Path | None:
        """Plain Hugging Face checkpoint (+ tokenizer) with the adapters folded in.

        Under DDP/FSDP call it on every rank (FSDP gathers the adapter); rank 0 writes and returns the path,
        the other ranks return ``None``. Computed on the accelerator (``export_placement``).
        """
        with self.export_placement():
            model = self._exportable_model()
            if model is None:
                return None
            return export_merged(
                model, path, tokenizer=self.tokenizer, overwrite=overwrite, device=self._export_device()
            )

    def export_peft_lora(
        self, path: str | Path, overwrite: bool = False, base: Literal["original", "dequantized"] = "original"
    ) -> Path | None:
        """Standard PEFT LoRA adapter (rank ≤ 2r) against the original base weights of ``self.model_name``.

        With a 4-bit base, ``base="dequantized"`` writes the current delta plus the dequantized base it is for
        (``lit_svd.export.export_peft_lora``). Under FSDP call it on every rank, as ``export_merged``.
        """
        with self.export_placement():
            model = self._exportable_model()
            if model is None:
                return None
            return export_peft_lora(
                model,
                path,
                base_model_name_or_path=str(self.model_name),
                overwrite=overwrite,
                device=self._export_device(),
                base=base,
            )


def _checkpointed_call(layer: torch.nn.Module, compiled: Callable[..., Any], *args, **kwargs) -> Any:
    """``compiled(*args, **kwargs)`` under ``layer``'s own activation checkpointing while it trains."""
    if layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
    return compiled(*args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a transformers model (``GradientCheckpointingLayer`` subclasses)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def _add_scaled_gradients(updates: Iterable[tuple[torch.Tensor, torch.Tensor, float]], gamma: float) -> None:
    """``p.grad += (γ/lr)·g`` for each ``(p, g, lr)``; a parameter without a gradient gets ``(γ/lr)·g``.

    One foreach add per learning rate instead of two kernels per parameter: a small model's step is bound by
    kernel launches.
    """
    to_add: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for p, g, lr in updates:
        if p.grad is None:
            p.grad = g * (gamma / lr)
        else:
            targets, sources = to_add[lr]
            targets.append(p.grad)
            sources.append(g)
    for lr, (targets, sources) in to_add.items():
        torch._foreach_add_(targets, sources, alpha=gamma / lr)


def _transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a wrapper (e.g. PEFT's ``PeftModel``, for research subclasses)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
