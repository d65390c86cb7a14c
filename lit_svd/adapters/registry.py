"""Name → adapter class. A new method is one file under ``lit_svd/adapters/`` using ``@register``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lit_svd.adapters.base import AdapterLayer

__all__ = ["register", "get_adapter_class", "available_adapters"]

_ADAPTERS: dict[str, type[AdapterLayer]] = {}


def register(name: str) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
    """Class decorator adding an ``AdapterLayer`` subclass to the registry under ``name``."""

    def add(cls: type[AdapterLayer]) -> type[AdapterLayer]:
        if name in _ADAPTERS and _ADAPTERS[name] is not cls:
            raise ValueError(f"adapter {name!r} is already registered by {_ADAPTERS[name].__qualname__}")
        _ADAPTERS[name] = cls
        return cls

    return add


def available_adapters() -> tuple[str, ...]:
    """Registered method names, sorted."""
    return tuple(sorted(_ADAPTERS))


def get_adapter_class(name: str) -> type[AdapterLayer]:
    """The class registered as ``name``; a ``ValueError`` listing the choices otherwise."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(available_adapters())}")
    return _ADAPTERS[name]
