"""Export a trained model: a plain merged Hugging Face checkpoint, or a standard PEFT LoRA adapter.

Both writers fill a temporary sibling directory and rename it into place at the end, so a failure never
leaves a half-written export behind.

PEFT export: for every method the total change against the *original* base weight is
``ΔW = (W_base + P_t Q_tᵀ) − W = P_t Q_tᵀ − P_0 Q_0ᵀ = [P_t, −P_0] [Q_t, Q_0]ᵀ`` (rank ≤ 2r; ≤ r for LoRA,
whose ``P_0 Q_0ᵀ = 0``), so it is written as a LoRA of rank 2r (r for LoRA) through a thin SVD of the
factored ``ΔW`` — no m×n matrix is formed. Served on the original base model (vLLM, PEFT, …) it
reproduces our trained model. Two methods are written in their own PEFT format instead: DoRA as a LoRA
with ``use_dora=True`` (the same rank ≤ 2r direction factors, plus ``lora_magnitude_vector``), and VeRA as
a PEFT VeRA adapter (``vera_lambda_b``/``vera_lambda_d`` per layer and the shared ``vera_A``/``vera_B``;
``projection_prng_key`` = our seed, so PEFT would re-derive the same matrices).

4-bit bases (``base_quantization="nf4"``): the merged export writes ``deq(base) + delta`` in the base's
original dtype (a plain checkpoint). A PEFT adapter can target one of two bases, and ``lit_svd.json`` in the
export says which (``expected_base``): ``"original"`` (default; the rank-2r change against the original
full-precision ``W``, so the served model is ``W_res + delta``, i.e. the trained model without the base's
quantization error — what QLoRA users usually serve) or ``"dequantized"`` (the current delta alone, rank
≤ r, plus the dequantized base ``deq(Q(W_res))`` written as a plain checkpoint in ``base_model/`` beside
it: together they reproduce the trained model exactly).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from torch import nn

from lit_svd.adapters import AdapterLayer
from lit_svd.inject import _visiting, adapter_layers
from lit_svd.linalg import low_rank_svd

__all__ = ["atomic_directory", "merged_state_dict", "export_merged", "peft_lora_factors", "export_peft_lora"]


def _write_failure(error: BaseException) -> tuple[int, str]:
    """``(errno, reason)`` of a failed write: an ``OSError``'s own, or parsed from safetensors' message.

    safetensors reports the operating system's error inside its own exception type, e.g. "Error while
    serializing: I/O error: File too large (os error 27)" for a write past the file-size limit.
    """
    if isinstance(error, OSError):
        return error.errno or errno.EIO, str(error.strerror or error)
    found = re.search(r"os error (\d+)", str(error))
    number = int(found.group(1)) if found else errno.EIO
    return number, os.strerror(number) if found else str(error)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes without error."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"export target already exists and is not empty: {target} (pass overwrite=True)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            yield staging
        except (OSError, SafetensorError) as error:  # a full disk, an I/O error: say what was and was not touched
            kept = f"{target} is unchanged" if target.exists() else f"nothing was written to {target}"
            number, reason = _write_failure(error)
            raise OSError(number, f"writing the export to {target} failed ({reason}); {kept}") from error
        if target.exists():  # moved aside, not deleted, until the new export is in place
            previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous.", dir=target.parent))
            os.replace(target, previous / target.name)
            os.replace(staging, target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _check_exportable(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no lit_svd adapters to export")
    for name, layer in layers:
        if not bool(layer.initialized):
            raise ValueError(f"adapter '{name}' was never initialised; train (or initialise) before exporting")
        if layer.merged:
            raise ValueError(f"adapter '{name}' is merged; unmerge() before exporting")
    return layers


@torch.no_grad()
def merged_state_dict(
    model: nn.Module, device: torch.device | str | None = None, with_delta: bool = True
) -> dict[str, torch.Tensor]:
    """The state dict the merged plain model would have, computed layer by layer (model unchanged).

    Args:
        model: A model with initialised adapters.
        device: Where to form each merged weight (``None``: where the layer is). A model that waits in
            host memory (e.g. after ``Trainer.fit``, which moves it back to the CPU) is merged in seconds on
            the GPU, each layer visiting it, instead of minutes on the host; the merged weights come back
            to where the layer lives.
        with_delta: ``False``: the base weights alone (e.g. the dequantized 4-bit base for a PEFT adapter of
            the current delta).
    """
    layers = dict(_check_exportable(model))
    state = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:  # an adapter tensor: not part of the plain model
            continue
        layer_name = owner.removesuffix(".base_layer")
        if owner.endswith(".base_layer") and layer_name in layers:
            if leaf == "weight":
                tensor = _merged_weight(layers[layer_name], device, with_delta, tensor.dtype, tensor.device)
            key = f"{layer_name}.{leaf}"
        state[key] = tensor
    for name, layer in layers.items():
        if layer.quantized:  # a 4-bit base is not in the state dict: its merged weight is formed here
            home = layer.initialized.device
            state[f"{name}.weight"] = _merged_weight(layer, device, with_delta, layer.base_layer.dtype, home)
    return state


def _merged_weight(
    layer: AdapterLayer, device: torch.device | str | None, with_delta: bool, dtype: torch.dtype, home: torch.device
) -> torch.Tensor:
    """``layer``'s merged weight (``W_base`` alone without ``with_delta``) in its module's layout ((in, out) for
    ``Conv1D``) and ``dtype``, formed on ``device`` and returned on ``home``."""
    with _visiting(layer, device):
        merged = layer.merged_weight() if with_delta else layer.weight_matrix().float()
        merged = (merged.T if layer.is_conv1d else merged).to(dtype).contiguous()
    return merged.to(home)


def export_merged(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
) -> Path:
    """Write a plain Hugging Face checkpoint (+ tokenizer) with every adapter folded in.

    ``AutoModelForCausalLM.from_pretrained(path)`` then loads it with the same logits. The in-memory
    model keeps its adapters. ``device``: where to merge (``merged_state_dict``).
    """
    state = merged_state_dict(model, device)
    with atomic_directory(path, overwrite) as staging:
        model.save_pretrained(staging, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(path)


@torch.no_grad()
def peft_lora_factors(
    layer: AdapterLayer, device: torch.device | str | None = None, against: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``lora_A`` (k, n) and ``lora_B`` (m, k) with ``lora_B @ lora_A = ΔW`` against the original weight.

    ``k = r`` for methods whose init leaves the base weight unchanged (LoRA), else ``2r``. The float64 thin
    SVD runs on ``device`` (``None``: where the layer is; only the adapter factors travel), and the factors
    come back to the layer's device. ``against="base"``: the current delta alone (``k = r``), for serving on
    the layer's own (e.g. dequantized 4-bit) base weight.
    """
    P_t, Q_t = layer.low_rank_factors(layer.factors())
    if layer.decomposition is not None and against == "original":
        P_0, Q_0 = layer.initial_low_rank_factors()
        P_t, Q_t = torch.cat([P_t, -P_0], dim=1), torch.cat([Q_t, Q_0], dim=1)
    home = P_t.device
    U, S, V = low_rank_svd(P_t.to(device or home, torch.float64), Q_t.to(device or home, torch.float64))
    root = S.sqrt()
    return (V * root).T.float().contiguous().to(home), (U * root).float().contiguous().to(home)


def _vera_tensors(layers: list[tuple[str, AdapterLayer]]) -> dict[str, torch.Tensor]:
    """PEFT VeRA state: per-layer ``vera_lambda_b`` (m,), ``vera_lambda_d`` (r,) and the shared projections."""
    shared = {id(layer.projections) for _, layer in layers}
    if len(shared) > 1:
        raise ValueError("VeRA layers on several devices hold several projection pairs; move the model to one device")
    tensors = {}
    for name, layer in layers:
        tensors[f"base_model.model.{name}.vera_lambda_b"] = layer.lambda_b.detach().float().cpu()
        tensors[f"base_model.model.{name}.vera_lambda_d"] = layer.lambda_d.detach().float().cpu()
    projections = layers[0][1].projections
    tensors["base_model.vera_A"] = projections.A.float().cpu().contiguous()
    tensors["base_model.vera_B"] = projections.B.float().cpu().contiguous()
    return tensors


def export_peft_lora(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    base: Literal["original", "dequantized"] = "original",
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` of an equivalent PEFT LoRA adapter.

    DoRA is written as a PEFT DoRA adapter (LoRA with ``use_dora=True``) and VeRA as a PEFT VeRA adapter
    (see the module docstring); ``PeftModel.from_pretrained`` reads either.

    Args:
        model: A model with trained lit_svd adapters (any method).
        path: Output directory (created atomically).
        base_model_name_or_path: Recorded in the config so ``PeftModel.from_pretrained`` users know which
            original base model to load.
        overwrite: Replace an existing non-empty ``path``.
        device: Where to compute the factors (``peft_lora_factors``); ``None``: where each layer is.
        base: Which base the adapter is for (recorded as ``expected_base`` in ``lit_svd.json``).
            ``"original"``: the original full-precision weights (rank 2r; with a 4-bit base the served model
            lacks the base's quantization error). ``"dequantized"`` (4-bit bases only): the current delta
            alone, and the dequantized base written to ``path/base_model`` (a plain checkpoint, recorded as
            ``base_model_name_or_path``); the two reproduce the trained model exactly.
    """
    from safetensors.torch import save_file

    try:
        from peft import LoraConfig, VeraConfig
    except ImportError as err:  # peft is an optional dependency
        raise ImportError("export_peft_lora needs peft: pip install peft") from err
    if base not in ("original", "dequantized"):
        raise ValueError(f"base must be 'original' or 'dequantized', got {base!r}")
    layers = _check_exportable(model)
    quantization = {layer.base_quantization for _, layer in layers} - {None}
    if base == "dequantized" and not quantization:
        raise ValueError("base='dequantized' is for models with a 4-bit base; this one is full precision")
    conv = {layer.is_conv1d for _, layer in layers}
    if len(conv) > 1:
        raise ValueError("cannot export a mix of nn.Linear and Conv1D adapters to one PEFT config (fan_in_fan_out)")
    base_path = str(Path(path) / "base_model") if base == "dequantized" else base_model_name_or_path
    first = layers[0][1]
    targets = [name for name, _ in layers]
    if first.method == "vera":
        tensors = _vera_tensors(layers)
        config = VeraConfig(
            r=first.rank,
            target_modules=targets,
            projection_prng_key=first.seed,
            save_projection=True,  # written anyway: the file then does not depend on PEFT's generator
            d_initial=first.d_initial,
            fan_in_fan_out=conv.pop(),
            base_model_name_or_path=base_path,
            task_type="CAUSAL_LM",
        )
    else:
        tensors, ranks = {}, set()
        for name, layer in layers:
            A, B = peft_lora_factors(layer, device, against="base" if base == "dequantized" else "original")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise ValueError(f"adapter '{name}' has non-finite values; nothing exported")
            ranks.add(A.shape[0])
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu()
            if layer.method == "dora":  # PEFT: m / ‖W + B A‖ with the original W and scaling 1, as here
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = layer.magnitude.detach().float().cpu()
        (rank,) = ranks
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,  # scaling 1: the factors already carry the method's scale
            target_modules=targets,
            fan_in_fan_out=conv.pop(),
            use_dora=first.method == "dora",
            base_model_name_or_path=base_path,
            task_type="CAUSAL_LM",
        )
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise ValueError("the adapter has non-finite values; nothing exported")
    info = {"method": layers[0][1].method, "rank": layers[0][1].rank, "expected_base": base}
    if quantization:
        info["base_quantization"] = quantization.pop()
        info["note"] = (
            "trained on a 4-bit base deq(Q(W_res)); this adapter is the change against the original full-precision "
            "weights, so served on them it gives W_res + delta: the trained model without the base's quantization "
            "error. For the exact trained model use export_merged, or base='dequantized'."
            if base == "original"
            else "the current adapter delta for the dequantized 4-bit base in base_model/ (a plain checkpoint): "
            "together they reproduce the trained model exactly."
        )
    with atomic_directory(path, overwrite) as staging:
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        (staging / "lit_svd.json").write_text(json.dumps(info))
        if base == "dequantized":
            model.save_pretrained(staging / "base_model", state_dict=merged_state_dict(model, device, with_delta=False))
    return Path(path)
