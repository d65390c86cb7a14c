"""lit_svd: SVD-family adapters (SORSA, PiSSA, OLoRA, OSoRA, MiLoRA, LoRA; DoRA, VeRA) for Hugging Face causal LMs.

Everything a user needs is importable from here::

    from lit_svd import LitSVDAdapter, SVDInit, SpectralMonitor, GSM8KDataModule, AdapterConfig

The names are loaded lazily (PEP 562 ``__getattr__``): ``import lit_svd`` imports neither torch, Lightning
nor transformers; the first use of a name imports the module that defines it. So the ``lightning`` command,
``--help`` and a script that only needs ``lit_svd.eval`` start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; tests/test_public_api.py checks that it and __all__ name the same set
_EXPORTS: dict[str, str] = {
    # adapters and their configuration
    "AdapterConfig": "lit_svd.config",
    "AdapterLayer": "lit_svd.adapters",
    "available_adapters": "lit_svd.adapters",
    "get_adapter_class": "lit_svd.adapters",
    "register": "lit_svd.adapters",
    # putting adapters into a model and taking them out
    "adapter_layers": "lit_svd.inject",
    "adapter_state_dict": "lit_svd.inject",
    "initialize_adapters": "lit_svd.inject",
    "inject_adapters": "lit_svd.inject",
    "load_adapter_state_dict": "lit_svd.inject",
    "merge_adapters": "lit_svd.inject",
    "orthonormal_regularizer": "lit_svd.inject",
    "trainable_parameter_count": "lit_svd.inject",
    # export
    "export_merged": "lit_svd.export",
    "export_peft_lora": "lit_svd.export",
    # models
    "EMBEDDED_MODEL": "lit_svd.models",
    "load_causal_lm": "lit_svd.models",
    "load_tokenizer": "lit_svd.models",
    # Lightning: module, callbacks, data, command line
    "LitSVDAdapter": "lit_svd.module",
    "SVDInit": "lit_svd.callbacks",
    "SpectralMonitor": "lit_svd.callbacks",
    "RunSummary": "lit_svd.callbacks",
    "CommonsenseDataModule": "lit_svd.data",
    "GSM8KDataModule": "lit_svd.data",
    "InstructionDataModule": "lit_svd.data",
    "MATHDataModule": "lit_svd.data",
    "MetaMathQADataModule": "lit_svd.data",
    "run_recipe": "lit_svd.cli",
    # evaluation
    "evaluate": "lit_svd.eval",
}

__all__ = [
    "EMBEDDED_MODEL",
    "AdapterConfig",
    "AdapterLayer",
    "CommonsenseDataModule",
    "GSM8KDataModule",
    "InstructionDataModule",
    "LitSVDAdapter",
    "MATHDataModule",
    "MetaMathQADataModule",
    "RunSummary",
    "SVDInit",
    "SpectralMonitor",
    "adapter_layers",
    "adapter_state_dict",
    "available_adapters",
    "evaluate",
    "export_merged",
    "export_peft_lora",
    "get_adapter_class",
    "initialize_adapters",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_causal_lm",
    "load_tokenizer",
    "merge_adapters",
    "orthonormal_regularizer",
    "register",
    "run_recipe",
    "trainable_parameter_count",
]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from lit_svd.adapters import AdapterLayer, available_adapters, get_adapter_class, register
    from lit_svd.callbacks import RunSummary, SpectralMonitor, SVDInit
    from lit_svd.cli import run_recipe
    from lit_svd.config import AdapterConfig
    from lit_svd.data import (
        CommonsenseDataModule,
        GSM8KDataModule,
        InstructionDataModule,
        MATHDataModule,
        MetaMathQADataModule,
    )
    from lit_svd.eval import evaluate
    from lit_svd.export import export_merged, export_peft_lora
    from lit_svd.inject import (
        adapter_layers,
        adapter_state_dict,
        initialize_adapters,
        inject_adapters,
        load_adapter_state_dict,
        merge_adapters,
        orthonormal_regularizer,
        trainable_parameter_count,
    )
    from lit_svd.models import EMBEDDED_MODEL, load_causal_lm, load_tokenizer
    from lit_svd.module import LitSVDAdapter


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use and cache the attribute here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_svd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
