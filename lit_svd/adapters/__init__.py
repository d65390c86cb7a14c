"""Adapter layers, one module per method, and the registry that maps names to them."""

from lit_svd.adapters.base import AdapterLayer

# Importing a method's module registers it: adding an adapter is one file plus one line here.
from lit_svd.adapters.corda import CorDALayer  # noqa: I001
from lit_svd.adapters.dora import DoRALayer
from lit_svd.adapters.eva import EVALayer
from lit_svd.adapters.loftq import LoftQLayer
from lit_svd.adapters.lora import LoRALayer
from lit_svd.adapters.loraga import LoRAGALayer
from lit_svd.adapters.milora import MiLoRALayer
from lit_svd.adapters.olora import OLoRALayer
from lit_svd.adapters.osora import OSoRALayer
from lit_svd.adapters.pissa import PiSSALayer
from lit_svd.adapters.registry import available_adapters, get_adapter_class, register
from lit_svd.adapters.sorsa import SORSALayer
from lit_svd.adapters.vera import VeRALayer

__all__ = [
    "AdapterLayer",
    "CorDALayer",
    "DoRALayer",
    "EVALayer",
    "LoftQLayer",
    "LoRALayer",
    "LoRAGALayer",
    "MiLoRALayer",
    "OLoRALayer",
    "OSoRALayer",
    "PiSSALayer",
    "SORSALayer",
    "VeRALayer",
    "available_adapters",
    "get_adapter_class",
    "register",
]
