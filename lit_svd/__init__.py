"""lit_svd: SVD-family adapters (SORSA, PiSSA, OLoRA, OSoRA, LoRA) for Hugging Face causal LMs."""

from lit_svd.adapters import AdapterLayer, available_adapters, get_adapter_class, register
from lit_svd.config import AdapterConfig
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

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "adapter_layers",
    "adapter_state_dict",
    "available_adapters",
    "get_adapter_class",
    "initialize_adapters",
    "inject_adapters",
    "load_adapter_state_dict",
    "merge_adapters",
    "orthonormal_regularizer",
    "register",
    "trainable_parameter_count",
]
