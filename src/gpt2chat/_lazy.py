"""Lazy attributes for package `__init__`s: a name loads its module on first use, then stays cached.

Keeps `import gpt2chat` (and its sub-packages) free of torch, transformers and FastAPI until needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, table: dict[str, tuple[str, str]], namespace: dict[str, Any]
                 ) -> Callable[[str], Any]:
    """A module-level `__getattr__` serving `table` (name -> (module, attribute)) into `namespace`."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attr = table[name]
        value = getattr(importlib.import_module(module_name), attr)
        namespace[name] = value
        return value

    return __getattr__
